"""Serve any Hugging Face causal LM; TorchServe hosts it through one thin adapter.

Each folder is a layer, and each layer imports only from the ones above it
(`tests/unit/test_layout.py` holds the order; docs/architecture.md draws it).

The vocabulary every layer shares
    `errors`           client errors as data (status, field, details), never a failed batch
    `response_format`  `parameters.response_format` checked into a frozen, hashable value
    `params`           generation parameters: merge the layers, coerce, verify, one frozen object
    `settings`         the app's `handler:` config and the container's environment, read once
    `cancellation`     cancel on disconnect: request ids whose client left, the socket the front says so on

`structured`: structured output
    `structured.constraint`      `GrammarConstraint`: one sequence's grammar as a logits mask, run first
    `structured.grammars`        compile response formats once each, bounded, in a killable child; LRU cache
    `structured.grammar_worker`  that child: xgrammar's compiler, run as a script
    `structured.tools`           tool calls: one format, its grammar (a structural tag), its prompt block, its parser

`pipeline`: a request after its protocol has parsed it
    `pipeline.shapes`   the native shapes (Vertex instances, TGI inputs, plain text) into instances
    `pipeline.prompts`  chat template and prompt template, token ids, token limits

`decoding`: one sequence's state, the same on both schedulers
    `decoding.stopping`     stop strings, finish reasons, the text a stream may release
    `decoding.detokenizer`  incremental detokenization, a short window per step
    `decoding.sequence`     `SequenceState`: one sequence's text, stop, finish reason and stream
    `decoding.sampling`     per-row logits processors; `front_processors` and `sequence_processors` are the lists both apply
    `decoding.penalties`    presence and frequency penalties and logit bias, as OpenAI defines them, per row
    `decoding.logprobs`     a generated token's log-probability and its top alternatives, from the raw logits

`model`: loading
    `model.device`        the device's facts: which one, bf16 by capability, the KV cache's size, sticky CUDA errors
    `model.loading`       threads, dtype, weight-format policy, model and tokenizer, `compile`
    `model.fusion`        Llama layers on the CPU: query-key-value and gate-up each one matmul, one lean forward
    `model.quantization`  post-load CPU quantization (int8, fp16, int4: weight-only, and packed from 4-bit weights)
    `model.dtype_probe`   `dtype: auto` on CPU: fp32, native bf16, fp16 and (on 4-bit weights) int4 timed in turns, the best kept
    `model.dtype_cache`   that decision kept per host fingerprint in a JSON file, so restarts and heals reuse it
    `model.sources`       where weights come from (Hub, local, SmolLM2 GGUF; `weights_dir`)
    `model.storage`       Cloud Storage copies (`AIP_STORAGE_URI`)

`schedulers`: prompts and one chunk sink in, completions out
    `schedulers.base`              the interface, the `honours` allow-lists, `Router`: the one routing rule
    `schedulers.dynamic`           batched `generate` over a TorchServe batch (per-row sampling, beams)
    `schedulers.continuous`        transformers' continuous batching manager
    `schedulers.batch_processors`  the manager's per-request processors
    `schedulers.row_attention`     the manager's CPU steps attend row by row, each row over its own keys (replaces `sdpa`)
    `schedulers.compiled_decode`   a CPU step that decodes every row's one token runs its fused int4 layers compiled
    `schedulers.compat`            every use of transformers' private internals
    `schedulers.threads`           torch work on threads that end, so that the manager's OpenMP pool is the only one

`api`: the protocols, each written once, at the edge
    `api.protocols`         the `Exchange` protocol; which protocol a request speaks (header or body shape)
    `api.native`            the native exchange: the `predictions` body and the stream's JSON lines
    `api.openai`            the OpenAI API: `api.openai.parsing` (bodies in, tools included), `api.openai.rendering`
                            (`chat.completion`/`text_completion` with `tool_calls`, SSE, errors out), `api.openai.exchange`
    `api.openai_responses`  OpenAI's Responses API, stateless: `api.openai_responses.parsing` (input items, text.format,
                            tools), `api.openai_responses.rendering` (the `response` object, its typed SSE events),
                            `api.openai_responses.exchange`
    `api.anthropic`         Anthropic's Messages API: `api.anthropic.parsing` (bodies in, tools and tool blocks
                            included), `api.anthropic.rendering` (`message` with `tool_use` blocks, its SSE
                            events, token counts, errors out), `api.anthropic.exchange`

The assembly
    `metrics`             what each completion reports
    `service`             pipeline plus schedulers, server-agnostic: `prepare`, `answer`
    `torchserve_handler`  the adapter, the only module that imports `ts`

docs/architecture.md follows a request through these layers.
"""
