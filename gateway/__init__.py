"""The HTTP front: the one public face of the server, locally and in the container.

TorchServe's own HTTP servers are frozen code (its last release is 0.12.0) and its
``/ping`` says Healthy while the model is still loading; they stay on loopback, on ports
picked free at every start. The front owns the public port, serves Vertex's routes and a
truthful health route, relays predictions as they stream, and brings an app back when its
worker dies.

Modules: ``settings`` (env contract, read once), ``torchserve`` (the TorchServe child:
ports, temp folder, process group), ``health`` (what the management API says),
``healer`` (notice a dead worker, answer what it held, bring the app back), ``relay``
(one prediction to TorchServe and back), ``routes`` (every route, one table),
``metrics`` (Prometheus histograms), ``server`` (uvicorn servers and the front's state),
``supervisor`` (all of it as one process tree).
"""
