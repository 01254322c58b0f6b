"""Serve any Hugging Face causal LM; TorchServe hosts it through one thin adapter.

Layers, each importing only from the ones above it:

Request pipeline (no model, no server)
    `errors`     client errors as data (status, field, details), never a failed batch
    `response_format`  `parameters.response_format` checked into a frozen, hashable value
    `params`     generation parameters: merge the layers, coerce, verify, one frozen object
    `requests`   request shapes (Vertex instances, TGI inputs, plain text) into instances
    `prompts`    chat template and prompt template, token ids, token limits
    `settings`   the app's `handler:` config and the container's environment, read once

Per-sequence state (used by both schedulers)
    `constraint`   `GrammarConstraint`: one sequence's grammar as a logits mask, run first
    `stopping`     stop strings, finish reasons, the text a stream may release
    `detokenizer`  incremental detokenization, a short window per step
    `sequence`     `SequenceState`: one sequence's text, stop, finish reason and stream
    `sampling`     per-row logits processors; `front_processors` and `sequence_processors` are the lists both apply
    `penalties`    presence and frequency penalties and logit bias, as OpenAI defines them, per row
    `logprobs`     a generated token's log-probability and its top alternatives, from the raw logits

Structured output
    `grammars`        compile response formats once each, bounded, in a killable child; LRU cache
    `grammar_worker`  that child: xgrammar's compiler, run as a script

Loading
    `loading`       device, threads, dtype, weight-format policy, model and tokenizer, `compile`
    `quantization`  post-load CPU quantization (int8, fp16, int4 weight-only)
    `dtype_probe`   `dtype: auto` on CPU: fp32, native bf16 and fp16 weights timed, the fastest kept
    `sources`       where weights come from (Hub, local, SmolLM2 GGUF; `weights_dir`)
    `storage`       Cloud Storage copies (`AIP_STORAGE_URI`)
    `threads`       torch work on threads that end, so that the manager's OpenMP pool is the only one

Schedulers (prompts and one chunk sink in, completions out)
    `scheduler`         the interface, `honours` capability sets, `Router`: the one routing rule
    `dynamic`           batched `generate` over a TorchServe batch (per-row sampling, beams)
    `continuous`        transformers' continuous batching manager
    `batch_processors`  the manager's per-request processors
    `compat`            every use of transformers' private internals

Service and server
    `responses`           the `predictions` body and the stream's JSON lines
    `openai`              the OpenAI API (package): bodies in, `chat.completion`/`text_completion`, SSE, errors out
    `protocols`           which protocol a request speaks (header or body shape), one exchange per request
    `metrics`             what each completion reports
    `service`             pipeline plus schedulers, server-agnostic: `prepare`, `answer`
    `torchserve_handler`  the adapter, the only module that imports `ts`

docs/architecture.md follows a request through these layers.
"""
