"""Anthropic's Messages API as a translation at the edge, beside the OpenAI one.

`parsing` turns a `/v1/messages` or `/v1/messages/count_tokens` body into the pipeline's
instance and `GenerationParams` (through the native validation, under Anthropic's field
names); `rendering` turns the completion back into a `message`, its SSE events, a token
count, and errors into `{"type": "error", "error": {type, message}}`; `exchange` is the
request's `Exchange`. The schedulers never see the protocol.
"""
