# Two commands do all set-up on a fresh machine (README):
#   make demo   - create .venv, install, build slimkern, run the main job
#   make test   - create .venv, install, build slimkern (CUDA too when possible), run every test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export MAX_JOBS ?= 2
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0

.PHONY: venv build test test-py test-capabilities test-triton test-ctest test-sanitize demo bench gpu-check clean

$(VENV)/.installed: requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

# ninja rebuilds only what changed; FORCE_CUDA=1 (CI) makes a failed CUDA build an error.
build: venv
	$(PY) -m pip install --no-build-isolation --no-deps -v -e . 2>&1 | grep -E "slimkern build configuration|^  [a-zA-Z_]+ +|error|Error|Successfully" || (echo "build failed"; exit 1)
	$(PY) -c "import slimkern, slimkern._library as L; assert L.LOAD_ERROR is None, L.LOAD_ERROR"

test: build test-py test-capabilities test-triton test-ctest test-sanitize

test-py:
	$(PY) -m pytest python_tests -m "not triton" -q

# The C++ CPU kernels are built for the x86-64 baseline, AVX2 and AVX-512, and the widest the
# CPU has runs; SLIMKERN_CPU_CAPABILITY forces a narrower one, so the op, packed-pass and solver
# tests run on every path whatever CPU runs them (test_info checks the path really switched).
CAPABILITY_TESTS := python_tests/test_block_ops.py python_tests/test_switchable_bn.py \
	python_tests/test_packed.py python_tests/test_solvers.py python_tests/test_info.py
test-capabilities:
	for cap in avx2 default; do \
		echo "== SLIMKERN_CPU_CAPABILITY=$$cap"; \
		SLIMKERN_CPU_CAPABILITY=$$cap $(PY) -m pytest $(CAPABILITY_TESTS) -m "not triton" -q || exit 1; \
	done

# Triton kernels run on the CPU through the interpreter; it must be set before import.
test-triton:
	TRITON_INTERPRET=1 $(PY) -m pytest python_tests -m triton -q || [ $$? -eq 5 ]

# The plain-C++ solver core, built and unit-tested standalone (no torch).
test-ctest: venv
	$(VENV)/bin/cmake -S cmake -B build/cmake -DCMAKE_BUILD_TYPE=Release
	$(VENV)/bin/cmake --build build/cmake -j $(MAX_JOBS)
	for cap in "" avx2 default; do \
		SLIMKERN_CPU_CAPABILITY=$$cap $(VENV)/bin/ctest --test-dir build/cmake --output-on-failure || exit 1; \
	done

# AddressSanitizer + UndefinedBehaviorSanitizer: the extension (CPU) and the solver core built
# into build/sanitize/, ctest there, then the C++-op tests against that build (SLIMKERN_EXTENSION
# loads it instead of slimkern/_C; libasan preloaded because python itself is not instrumented,
# libstdc++ with it so ASan's __cxa_throw interceptor finds the real one: TORCH_CHECK throws).
# Leak checks are off: CPython and torch keep allocations alive until exit by design. opcheck
# imports Triton, whose LLVM aborts under the preloaded ASan runtime: the regular build runs it.
SAN := build/sanitize
SAN_TESTS := python_tests/test_block_ops.py python_tests/test_switchable_bn.py python_tests/test_solvers.py \
	python_tests/test_fuzz_raw_ops.py python_tests/test_packed.py
SAN_ENV := ASAN_OPTIONS=detect_leaks=0:protect_shadow_gap=0:alloc_dealloc_mismatch=0:abort_on_error=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
test-sanitize: venv
	SLIMKERN_SANITIZE=1 FORCE_CUDA=0 $(PY) setup.py -q build_ext --build-lib $(SAN)/lib --build-temp $(SAN)/tmp
	$(VENV)/bin/cmake -S cmake -B $(SAN)/cmake -DCMAKE_BUILD_TYPE=Debug -DSLIMKERN_SANITIZE=ON > /dev/null
	$(VENV)/bin/cmake --build $(SAN)/cmake -j $(MAX_JOBS) > /dev/null
	$(SAN_ENV) $(VENV)/bin/ctest --test-dir $(SAN)/cmake --output-on-failure
	$(SAN_ENV) LD_PRELOAD="$$($${CXX:-c++} -print-file-name=libasan.so) $$($${CXX:-c++} -print-file-name=libstdc++.so)" \
		SLIMKERN_EXTENSION=$$(ls $(SAN)/lib/slimkern/_C*.so) \
		$(PY) -m pytest $(SAN_TESTS) -m "not triton and not slow" -k "not opcheck" -q -p no:cacheprovider

# The main job: what was built, then the federated ParaDiS demo (slimkern demo).
demo: build
	$(VENV)/bin/slimkern info
	$(VENV)/bin/slimkern demo

bench: build
	$(PY) -m pytest benchmarks -q --benchmark-json=benchmarks/results/latest.json

# On a CUDA machine: build the CUDA kernels for the present GPU, pytest -m gpu, the GPU benchmarks
# (benchmarks/results/gpu_*.json), all in under 8 minutes; without a GPU it says so and exits 0.
GPU_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
gpu-check: venv
	MAX_JOBS=$(GPU_JOBS) $(PY) benchmarks/gpu_check.py

clean:
	rm -rf build *.egg-info slimkern/_C*.so
