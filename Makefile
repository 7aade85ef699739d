# Everyday commands. `make test` is what CI runs (after `pip install torch==2.13.0`).
PYTHON ?= python
PIP_INSTALL = $(PYTHON) -m pip install --no-build-isolation

.PHONY: install test lint format cpp-test py-test bench bench-quick render gpu-check demo clean

install:            ## the package, its extension (C++ always, CUDA when possible) and the test/bench extras
	$(PIP_INSTALL) -e ".[test,bench]"

test: install lint cpp-test py-test   ## everything CI checks

lint:               ## ruff lint + format check
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

cpp-test:           ## C++ unit tests of the torch-free kernels (+ the CUDA compile check when nvcc is found), and the
                    ## CUDA Sinkhorn kernels run in a CPU emulation of their threads against the CPU kernels
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release
	cmake --build build/cmake -j2
	ctest --test-dir build/cmake --output-on-failure
	EMU_BUILD=build/emulation bash csrc/tests/emulation/run.sh

py-test:            ## the Python suite; the cpp and Triton (interpreter) backends must run, not skip
	S2DC_REQUIRE_BACKENDS=cpp,triton $(PYTHON) -m pytest tests -q -ra

bench-quick:        ## the quick benchmark of every op against its reference on this device
	$(PYTHON) benchmarks/run.py --quick

bench:              ## the full CPU benchmark, appended to benchmarks/results/results.csv
	$(PYTHON) benchmarks/run.py

render:             ## README tables from benchmarks/results/*.csv
	$(PYTHON) benchmarks/render.py

demo:               ## the training demo on nibabel's bundled MRI volumes -> runs/demo
	s2dc-train --out runs/demo

gpu-check:          ## on a CUDA machine: install, CUDA tests, GPU benchmarks -> $(OUT)
	bash scripts/gpu_check.sh $(or $(OUT),gpu_check_out)

clean:
	rm -rf build s2dc_kernels/*.so *.egg-info
