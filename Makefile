# Every target creates .venv when missing and installs the project into it; nothing is needed by hand.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch goes in first, pinned, from the CPU wheel: nothing may make pip pick another (multi-GB CUDA) build.
TORCH  := torch==2.13.0

export ORT_DISABLE_TELEMETRY := 1

.PHONY: demo test lint device-check browser tpm-packages bench bench-quick model clean

$(STAMP): pyproject.toml Makefile | tpm-packages
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[all,dev]' $(TORCH)
	# torchattacks (AutoAttack for the evaluation) with --no-deps: its own requirements pull torchvision and another torch.
	$(PY) -m pip install --quiet --no-deps torchattacks==3.5.1
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/edgeshield demo

# Debian's chromium for the status page's real-browser test (Playwright drives it by its path; nothing downloads a
# browser). Installed with apt-get as root, or through sudo.
browser:
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

# The software TPM the tests and the demo run against (swtpm, with swtpm-tools' local CA for EK certificates),
# tpm2-tools, and libtss2-dev, which tpm2-pytss (the [tpm] extra) compiles against; installed before pip runs.
tpm-packages:
	@command -v swtpm >/dev/null && command -v swtpm_setup >/dev/null && command -v tpm2_pcrread >/dev/null \
	  && [ -e /usr/include/tss2/tss2_esys.h ] || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends swtpm swtpm-tools tpm2-tools libtss2-dev >/dev/null; }

# Lint and type-check first, so a lint or type error fails CI before the slow steps run.
# The suite runs on two workers, a test file per worker at a time (module fixtures stay in one process); the slowest
# tests are listed at the end so a slow one is seen before CI's 30 minutes are.
PYTEST_WORKERS ?= 2
test: $(STAMP) lint browser
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --durations=25
	$(PY) scripts/check_device_install.py

# ruff over all the Python in the repository, mypy over the package (both configured in pyproject.toml).
lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks scripts
	$(PY) -m mypy

# A plain `pip install .` (no extras) into a fresh .venv-device, then every device-side command run there for real.
device-check: $(STAMP)
	$(PY) scripts/check_device_install.py

bench: $(STAMP)
	$(PY) benchmarks/bundles.py --json benchmarks/results/bundles.json
	$(PY) benchmarks/protect.py --json benchmarks/results/protect.json
	$(PY) benchmarks/adversarial.py --json benchmarks/results/adversarial.json
	$(PY) benchmarks/server.py --json benchmarks/results/server.json
	$(PY) benchmarks/extraction.py --json benchmarks/results/extraction.json
	$(PY) benchmarks/hardening.py --json benchmarks/results/hardening.json
	$(PY) benchmarks/monitoring.py --json benchmarks/results/monitoring.json
	$(PY) benchmarks/hardware.py --json benchmarks/results/hardware.json
	$(PY) benchmarks/robust_training.py --json benchmarks/results/robust_training.json
	$(PY) benchmarks/smoothing.py --json benchmarks/results/smoothing.json
	$(PY) benchmarks/tradeoff.py --json benchmarks/results/tradeoff.json

bench-quick: $(STAMP)
	$(PY) benchmarks/bundles.py --quick
	$(PY) benchmarks/protect.py --quick
	$(PY) benchmarks/adversarial.py --quick
	$(PY) benchmarks/server.py --quick
	$(PY) benchmarks/extraction.py --quick
	$(PY) benchmarks/hardening.py --quick
	$(PY) benchmarks/monitoring.py --quick
	$(PY) benchmarks/hardware.py --quick
	$(PY) benchmarks/robust_training.py --quick
	$(PY) benchmarks/smoothing.py --quick
	$(PY) benchmarks/tradeoff.py --quick

# Rebuild the bundled digits classifier (PyTorch -> ONNX).
model: $(STAMP)
	$(PY) scripts/train_digits.py --out src/edgeshield/models/digits.onnx

clean:
	rm -rf $(VENV) .venv-device .pytest_cache .hypothesis .mypy_cache .ruff_cache build dist
