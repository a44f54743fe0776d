#!/usr/bin/env python3
"""Train the bundled digits classifiers (PyTorch MLP) and export them to self-contained ONNX files.

    python scripts/train_digits.py [--epochs N] [--seed S] [--out PATH] [--state-dict PATH] [--robust [--arch A]]

Deterministic (fixed seeds, one CPU thread): digits.onnx in seconds; --robust (edgeshield.training, TRADES at
L-inf eps 2/16) writes digits_robust.onnx in under a minute. Checked against onnxruntime before it is written
(atomically) to --out. Needs the train extra. Lines 1-96 stay put: the exporter records them in digits.onnx.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ["ORT_DISABLE_TELEMETRY"] = "1"  # before anything can import onnxruntime

try:
    import edgeshield  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from edgeshield._io import atomic_write_bytes
from edgeshield.errors import MissingDependencyError
from edgeshield.models import (
    DIGITS_INPUT_NAME,
    DIGITS_NUM_CLASSES,
    DIGITS_NUM_FEATURES,
    DIGITS_OUTPUT_NAME,
    load_digits_split,
)

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "edgeshield" / "models" / "digits.onnx"
HIDDEN = (128, 64)
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4

try:
    import numpy as np
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError("training the digits model needs torch: install edgeshield[train]") from exc


def build_mlp() -> nn.Module:
    """The digits classifier: 64 -> 128 -> 64 -> 10, ReLU between layers; outputs logits."""
    layers: list[nn.Module] = []
    width = DIGITS_NUM_FEATURES
    for hidden in HIDDEN:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, DIGITS_NUM_CLASSES))
    return nn.Sequential(*layers)


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int) -> None:
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(order), BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    model.eval()


@torch.no_grad()
def torch_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    return model(torch.from_numpy(x)).numpy()


def export_onnx(model: nn.Module) -> bytes:
    """Export with the dynamo exporter (dynamic batch) and return one self-contained ONNX file's bytes."""
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover
        raise MissingDependencyError("exporting the digits model needs onnx: install edgeshield[train]") from exc

    class _Wrapped(nn.Module):  # gives the forward argument the public input name
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
            return self.inner(input)

    example = torch.zeros(2, DIGITS_NUM_FEATURES, dtype=torch.float32)
    program = torch.onnx.export(
        _Wrapped(model).eval(),
        (example,),
        dynamo=True,
        input_names=[DIGITS_INPUT_NAME],
        output_names=[DIGITS_OUTPUT_NAME],
        dynamic_shapes={"input": {0: torch.export.Dim("batch")}},
        external_data=False,
        verbose=False,
    )
    proto = program.model_proto
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise RuntimeError(f"exported model keeps initializer {tensor.name!r} as external data")
    proto.doc_string = "EdgeShield bundled digits classifier (sklearn load_digits, 8x8 pixels / 16)."
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def onnx_logits(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
    names_in = [i.name for i in sess.get_inputs()]
    names_out = [o.name for o in sess.get_outputs()]
    if names_in != [DIGITS_INPUT_NAME] or names_out != [DIGITS_OUTPUT_NAME]:
        raise RuntimeError(f"unexpected ONNX signature: inputs {names_in}, outputs {names_out}")
    return sess.run([DIGITS_OUTPUT_NAME], {DIGITS_INPUT_NAME: x})[0]


DEFAULT_ROBUST_OUT = DEFAULT_OUT.with_name("digits_robust.onnx")
ROBUST_DOC = ("EdgeShield bundled digits classifier, adversarially trained (TRADES, L-inf eps 2/16; sklearn "
              "load_digits, 8x8 pixels / 16).")


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(axis=1) == y).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default: 60; with --robust the recipe's, mlp 150 and cnn 30)")
    parser.add_argument("--seed", type=int, default=0, help="torch seed (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="ONNX output path (default: the bundled digits.onnx, or digits_robust.onnx)")
    parser.add_argument("--state-dict", type=Path, default=None, help="also save the torch state_dict here")
    parser.add_argument("--robust", action="store_true", help="adversarial training (edgeshield.training)")
    parser.add_argument("--arch", choices=("mlp", "cnn"), default="mlp",
                        help="with --robust: the architecture (default: %(default)s; cnn needs --out)")
    parser.add_argument("--method", choices=("trades", "pgd"), default="trades",
                        help="with --robust: TRADES or PGD adversarial training (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if not args.robust and (args.arch != "mlp" or args.method != "trades"):
        parser.error("--arch and --method go with --robust")
    if args.robust:
        if args.arch == "cnn" and args.out is None:
            parser.error("--arch cnn needs --out (the bundled robust model is the MLP)")
        return main_robust(args)
    if args.epochs is None:
        args.epochs = 60
    if args.out is None:
        args.out = DEFAULT_OUT

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    split = load_digits_split()
    model = build_mlp()
    train(model, split.x_train, split.y_train, epochs=args.epochs, seed=args.seed)

    model_bytes = export_onnx(model)
    t_train, t_test = torch_logits(model, split.x_train), torch_logits(model, split.x_test)
    o_train, o_test = onnx_logits(model_bytes, split.x_train), onnx_logits(model_bytes, split.x_test)
    if o_test.shape != (len(split.x_test), DIGITS_NUM_CLASSES):
        raise RuntimeError(f"unexpected ONNX output shape {o_test.shape}")
    if not (np.allclose(o_train, t_train, rtol=1e-4, atol=1e-4) and np.allclose(o_test, t_test, rtol=1e-4, atol=1e-4)):
        diff = float(np.abs(o_test - t_test).max())
        raise RuntimeError(f"ONNX logits differ from torch (max abs diff on test split {diff:.3g})")

    print(f"torch: train accuracy {accuracy(t_train, split.y_train):.4f}, "
          f"test accuracy {accuracy(t_test, split.y_test):.4f}")
    print(f"onnx:  train accuracy {accuracy(o_train, split.y_train):.4f}, "
          f"test accuracy {accuracy(o_test, split.y_test):.4f}")

    atomic_write_bytes(args.out, model_bytes)
    print(f"wrote {args.out} ({len(model_bytes)} bytes)")
    if args.state_dict is not None:
        torch.save(model.state_dict(), args.state_dict)
        print(f"wrote {args.state_dict} (torch state_dict)")
    return 0


def main_robust(args: argparse.Namespace) -> int:
    """The robust sibling: the library's architecture and recipe, exported without the exporter's stack traces."""
    from edgeshield.training import digits_cnn, digits_mlp, digits_robust_config, train_robust
    from edgeshield.training._robust import onnx_bytes

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    split = load_digits_split()
    model = digits_mlp() if args.arch == "mlp" else digits_cnn()
    overrides: dict[str, int] = {"seed": args.seed}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    config = digits_robust_config(arch=args.arch, method=args.method, **overrides)
    report = train_robust(model, split.x_train, split.y_train, config, x_val=split.x_test, y_val=split.y_test)
    print(f"{config.method}, L-inf eps {config.eps:g}, {config.epochs} epochs in {report.seconds:.1f} s: "
          f"test accuracy {report.clean_accuracy:.4f}, under training-time PGD-{config.steps} "
          f"{report.robust_accuracy:.4f}")
    model_bytes = onnx_bytes(model, np.concatenate([split.x_train, split.x_test]), input_name=DIGITS_INPUT_NAME,
                             output_name=DIGITS_OUTPUT_NAME, doc_string=ROBUST_DOC)
    print(f"onnx:  train accuracy {accuracy(onnx_logits(model_bytes, split.x_train), split.y_train):.4f}, "
          f"test accuracy {accuracy(onnx_logits(model_bytes, split.x_test), split.y_test):.4f}")
    out = args.out if args.out is not None else DEFAULT_ROBUST_OUT
    atomic_write_bytes(out, model_bytes)
    print(f"wrote {out} ({len(model_bytes)} bytes)")
    if args.state_dict is not None:
        torch.save(model.state_dict(), args.state_dict)
        print(f"wrote {args.state_dict} (torch state_dict)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
