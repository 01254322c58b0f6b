"""The HTTP front: the one public face of the server, locally and in the container.

TorchServe's own HTTP servers are frozen code (its last release is 0.12.0) and its
``/ping`` says Healthy while the model is still loading; they stay on loopback, on ports
picked free at every start. The front owns the public port, serves Vertex's routes and a
truthful health route, relays predictions as they stream, and brings an app back when its
worker dies.

Modules: ``contract`` (the default port, routes, content type and probe, one copy for the front
and the tools that talk to it), ``settings`` (env contract, read once), ``torchserve`` (the TorchServe child:
ports, temp folder, process group), ``health`` (what the management API says),
``management`` (the client of TorchServe's management and metrics APIs), ``apps`` (the app
registry: each app's state and the predictions it holds), ``healer`` (the heal policy: notice
a dead worker, answer what it held, bring the app back), ``held_request`` (one relayed
prediction's hold, gauge, histograms and release), ``relay`` (one prediction to TorchServe
and back), ``routes`` (every route, one table), ``openai_api`` and ``anthropic_api`` (the
OpenAI API's and Anthropic's Messages API's routes under ``/v1``), ``auth`` (the optional API key),
``metrics`` (Prometheus histograms), ``server`` (uvicorn servers and the front's state),
``supervisor`` (all of it as one process tree).
"""
