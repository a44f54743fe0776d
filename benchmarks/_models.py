"""The models the bundle benchmarks generate: a chain of MatMul nodes with deterministic random float32 weights.

``write_matmul_chain`` writes one either as a self-contained ONNX file or, with ``data_file``, as a graph file plus
one external data file beside it (how ONNX stores a model over 2 GB). Weights are drawn one ``dim x dim`` block at
a time and, for external data, written straight to the data file, so generating a multi-GB model holds one block.
"""

from __future__ import annotations

from pathlib import Path


def write_matmul_chain(path: Path, *, blocks: int, dim: int, seed: int, data_file: str | None = None) -> int:
    """Write ``x (N, dim) -> MatMul w0 -> ... -> MatMul w{blocks-1} -> y`` to ``path``; return the bytes written.

    The bytes are the graph file's plus, with ``data_file`` (a file name in ``path``'s directory), the data file's.
    The same ``blocks``, ``dim`` and ``seed`` give the same weights either way.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    scale = np.float32(1.0 / np.sqrt(dim))  # keeps activations bounded along the chain
    inits, nodes = [], []
    prev = "x"
    data = open(path.parent / data_file, "wb") if data_file else None  # noqa: SIM115 - closed below
    try:
        offset = 0
        for i in range(blocks):
            w = rng.standard_normal((dim, dim), dtype=np.float32)
            w *= scale
            if data is None:
                inits.append(numpy_helper.from_array(w, name=f"w{i}"))
            else:
                tensor = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[dim, dim])
                for key, value in (("location", data_file), ("offset", str(offset)), ("length", str(w.nbytes))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
                tensor.data_location = TensorProto.EXTERNAL
                data.write(w.data)
                offset += w.nbytes
                inits.append(tensor)
            del w
            out = "y" if i == blocks - 1 else f"h{i}"
            nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out], name=f"matmul{i}"))
            prev = out
    finally:
        if data is not None:
            data.close()
    graph = helper.make_graph(
        nodes,
        "matmul_chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", dim])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgeshield-bench")
    model.ir_version = 10
    serialized = model.SerializeToString()
    del model, graph, inits
    path.write_bytes(serialized)
    return len(serialized) + (offset if data_file else 0)
