"""OpenAI's Responses API (`POST /v1/responses`), stateless, beside the chat API it shares tools and errors with.

`parsing` turns a body into the pipeline's instance (input items and instructions into
messages, `text.format` into a response format, function tools into `structured.tools`);
`rendering` builds the `response` object and its typed SSE events from the same neutral pieces
chat renders; `exchange` is the `Exchange` the service and adapter hold.
"""
