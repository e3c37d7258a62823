"""The dashboard and the HTTP/JSON API (`/api/v1/`), served by `conveyor serve` itself.

Stack: Starlette (routing, requests, responses, streaming) on uvicorn, run inside the server's
own event loop next to grpc.aio (`server.py` drives uvicorn's startup/shutdown, not its signal
handling or process model). Why these two: both are widely used and actively maintained, small
(pure Python, a handful of dependencies), fully typed, asyncio-native (so a handler awaits the
same core objects the gRPC servicers use, with no thread hop), and Starlette's StreamingResponse
is all Server-Sent Events need. aiohttp would also fit, but brings its own event-loop
conventions and a much larger surface; a framework on top of Starlette (FastAPI) would add
pydantic for an API that is a thin adapter over protobuf messages.

Modules: `server.py` (listening), `app.py` (routes and middleware), `access.py` (tokens,
cookies, CSRF, Host check), `convert.py` (protobuf to plain JSON), `errors.py` (exceptions to
JSON errors), `routes/` (one module per resource), `live.py` and `sse.py` (Server-Sent Events),
`sampler.py` (the last hour of throughput and queue depth), `openapi.py`, `static/` (the pages).
"""
