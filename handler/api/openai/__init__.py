"""The OpenAI API as a translation at the edge, as vLLM's `entrypoints/openai` is.

`requests` turns a `chat/completions` or `completions` body into the pipeline's own
instances and `GenerationParams` (validated by `params` and `requests`, with their limits
and statuses); `responses` renders the completions back into `chat.completion` and
`text_completion` objects, stream pieces into SSE chunks, and errors into OpenAI's shape.
The schedulers never see the protocol.
"""
