# Benchmarks (bench/, docs/bench.md). Every variable can be set on the command line.
#
#   make bench                       our server on both batching paths (started and stopped by the
#                                    benchmark, free ports), raw transformers, llama.cpp's llama-server
#   make llama-server                build llama-server once per host (bench/.cache/, 15+ minutes on 2 cores)
#   make bench BENCH_ARGS=--quick    a short smoke run
#   make bench BENCH_SERVERS="torchserve=http://127.0.0.1:7080/predictions/smollm2"
#                                    an already running server (make serve) instead
#   make bench-single-stream         one stream: fp32, bf16, the handler.model.quantization methods, llama.cpp
#   make bench-dtype-stability       dtype: auto decided at three fresh starts, one beside a CPU burner
#   make soak                        30 minutes above capacity through make serve, worker kills, leavers
#
# Results: bench/results/serving.md|json and bench/results/single-stream.md|json (earlier: history.md).

APP ?= smollm2
PORT ?= 7080
# Space-separated [LABEL=]URL of running TorchServe predictions endpoints, benchmarked side by
# side. Empty: the benchmark serves APP itself on both paths (--serve-paths).
BENCH_SERVERS ?=
# Comma list of torchserve, transformers, llamacpp (llama-server), llamacpp-python (its serial server).
BENCH_TARGETS ?= torchserve,transformers,llamacpp
# For uniform and mixed; prefill and shared-prefix run at their own levels (--prefix-concurrency).
BENCH_CONCURRENCY ?= 1,4,16
BENCH_WORKLOADS ?= uniform,mixed,prefill,shared-prefix
# Anything else `python -m bench --help` lists, e.g. --quick, --no-stream, --hf-dtype float32.
BENCH_ARGS ?=
# Comma list of DTYPE[+QUANTIZATION] and llama.cpp; empty: the benchmark's default list.
SINGLE_STREAM_VARIANTS ?=
SINGLE_STREAM_ARGS ?=

.PHONY: bench bench-single-stream bench-dtype-stability soak llama-server

llama-server: ## build llama.cpp's llama-server from llama-cpp-python's sdist, cached per host in bench/.cache/
	$(PY) -m bench.llama_server_build

bench: model $(if $(findstring llamacpp,$(subst llamacpp-python,,$(BENCH_TARGETS))),llama-server) ## serving benchmark: our server on both batching paths, raw transformers, llama-server -> bench/results/
	$(PY) -m bench --app $(APP) --targets $(BENCH_TARGETS) --concurrency $(BENCH_CONCURRENCY) --workloads $(BENCH_WORKLOADS) \
		$(if $(BENCH_SERVERS),$(foreach server,$(BENCH_SERVERS),--server-url $(server)),--serve-paths) $(BENCH_ARGS)

bench-single-stream: model ## one-stream decode speed and quality per dtype/quantization -> bench/results/
	$(PY) -m bench.single_stream --model-dir models/$(APP) \
		$(if $(SINGLE_STREAM_VARIANTS),--variants $(SINGLE_STREAM_VARIANTS)) $(SINGLE_STREAM_ARGS)

# The GPU check (bench/gpu_check.py, docs/gpu.md): the CUDA path end to end on one GPU, about 5
# minutes; GPU_CHECK_DEVICE=cpu is its dry mode. The report goes to $(OUT), else bench/results/.
GPU_CHECK_DEVICE ?= cuda
GPU_CHECK_TOKENIZER_DIR ?= models/smollm2-tokenizer

.PHONY: gpu-check gpu-check-tokenizer

gpu-check: ## the CUDA path on GPU 0 in ~5 min (GPU_CHECK_DEVICE=cpu: dry mode) -> $OUT or bench/results/
	GPU_CHECK_DEVICE=$(GPU_CHECK_DEVICE) PYTHON=$(PY) scripts/gpu_check.sh

gpu-check-tokenizer: models/smollm2/config.json ## SmolLM2's tokenizer files alone (a few MB), to carry to a GPU host
	mkdir -p $(GPU_CHECK_TOKENIZER_DIR)
	cp models/smollm2/tokenizer.json models/smollm2/tokenizer_config.json $(GPU_CHECK_TOKENIZER_DIR)/
	if [ -f models/smollm2/chat_template.jinja ]; then cp models/smollm2/chat_template.jinja $(GPU_CHECK_TOKENIZER_DIR)/; fi

bench-dtype-stability: model ## dtype: auto decided at three fresh starts, one beside a CPU burner -> bench/results/
	$(PY) -m bench.dtype_stability --model-dir models/$(APP)

SOAK_ARGS ?=
soak: ## 30 minutes at 1.5x capacity through make serve (run it first): mixed protocols, a worker kill every 5 min -> bench/results/soak.json|png
	$(PY) -m bench.soak --url http://127.0.0.1:$(PORT) --app $(APP) --pid-file run/front.pid $(SOAK_ARGS)
