"""A small marketplace API to put the gateway in front of: products, artisans, users, orders.

Plain JSON over aiohttp, data in memory, no authentication of its own (that is the gateway's
job). Run it alone with ``python -m gateway.sample_upstream [--port 8081]``, or with the gateway
in front of it with ``python -m gateway.demo``.

It also stands in for an identity provider, so the gateway's JWT checks can be tried without
one: ``/.well-known/jwks.json`` publishes an ES256 key made at start, and ``POST /auth/token``
with ``{"user": "ada"}`` returns a token for a sample user (the issuer a real deployment has
would do this after a login).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import time
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec

PRODUCTS = [
    {"id": 1, "name": "Walnut serving board", "price": 48.0, "artisan_id": 1, "featured": True},
    {"id": 2, "name": "Hand-thrown mug", "price": 26.5, "artisan_id": 2, "featured": True},
    {"id": 3, "name": "Indigo linen scarf", "price": 39.0, "artisan_id": 3, "featured": False},
    {"id": 4, "name": "Beeswax candle set", "price": 18.0, "artisan_id": 1, "featured": False},
]
ARTISANS = [
    {"id": 1, "name": "Oak & Ember Workshop", "craft": "woodwork", "city": "Porto"},
    {"id": 2, "name": "Clayhouse Studio", "craft": "ceramics", "city": "Kyoto"},
    {"id": 3, "name": "Blue Loom", "craft": "textiles", "city": "Jaipur"},
]
USERS = [
    {"id": 1, "name": "Ada", "email": "ada@example.com"},
    {"id": 2, "name": "Lin", "email": "lin@example.com"},
]
# Who may do what, as the sample issuer puts it in tokens.
GRANTS = {
    "ada": {"sub": "1", "email": "ada@example.com", "roles": ["user"], "scope": "profile:read profile:write"},
    "lin": {"sub": "2", "email": "lin@example.com", "roles": ["user", "artisan"], "scope": "profile:read"},
    "guest": {"sub": "99", "roles": [], "scope": ""},
}
ISSUER = "https://id.marketplace.example"
AUDIENCE = "marketplace-api"
TOKEN_LIFETIME = 3600

COLLECTIONS = web.AppKey("collections", dict)


def _find(items: list[dict[str, Any]], raw_id: str) -> dict[str, Any]:
    for item in items:
        if str(item["id"]) == raw_id:
            return item
    raise web.HTTPNotFound(text='{"error": "not found"}', content_type="application/json")


def make_app() -> web.Application:
    app = web.Application()
    app[COLLECTIONS] = {
        "products": [dict(p) for p in PRODUCTS],
        "artisans": [dict(a) for a in ARTISANS],
        "users": [dict(u) for u in USERS],
        "orders": [],
    }
    ids = itertools.count(100)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def featured(request: web.Request) -> web.Response:
        return web.json_response([p for p in request.app[COLLECTIONS]["products"] if p["featured"]])

    async def listing(request: web.Request) -> web.Response:
        return web.json_response(request.app[COLLECTIONS][request.match_info["kind"]])

    async def item(request: web.Request) -> web.Response:
        items = request.app[COLLECTIONS][request.match_info["kind"]]
        return web.json_response(_find(items, request.match_info["id"]))

    async def create(request: web.Request) -> web.Response:
        try:
            document = await request.json()
        except ValueError:
            return web.json_response({"error": "expected a JSON body"}, status=400)
        if not isinstance(document, dict):
            return web.json_response({"error": "expected a JSON object"}, status=400)
        document["id"] = next(ids)
        request.app[COLLECTIONS][request.match_info["kind"]].append(document)
        return web.json_response(document, status=201)

    async def echo(request: web.Request) -> web.Response:
        """What the upstream received: handy to see what the gateway forwards."""
        return web.json_response(
            {
                "method": request.method,
                "path": request.raw_path,
                "headers": dict(request.headers),
                "body": (await request.read()).decode(errors="replace"),
            }
        )

    signing_key = ec.generate_private_key(ec.SECP256R1())
    public_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(signing_key.public_key()))
    public_jwk.update({"kid": "sample-1", "alg": "ES256", "use": "sig"})

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response({"keys": [public_jwk]}, headers={"Cache-Control": "public, max-age=300"})

    async def token(request: web.Request) -> web.Response:
        """A token for a sample user: {"user": "ada" | "lin" | "guest"}."""
        try:
            document = await request.json()
        except ValueError:
            document = None
        grant = GRANTS.get(document.get("user")) if isinstance(document, dict) else None
        if grant is None:
            return web.json_response({"error": f"expected {{\"user\": one of {sorted(GRANTS)}}}"}, status=400)
        now = int(time.time())
        claims = {**grant, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + TOKEN_LIFETIME}
        access_token = jwt.encode(claims, signing_key, algorithm="ES256", headers={"kid": "sample-1"})
        return web.json_response({"access_token": access_token, "token_type": "Bearer", "expires_in": TOKEN_LIFETIME})

    kinds = "{kind:products|artisans|users|orders}"
    app.router.add_get("/.well-known/jwks.json", jwks)
    app.router.add_post("/auth/token", token)
    app.router.add_get("/health", health)
    app.router.add_get("/api/products/featured", featured)
    app.router.add_get(f"/api/{kinds}", listing)
    app.router.add_get(f"/api/{kinds}/{{id}}", item)
    app.router.add_post(f"/api/{kinds}", create)
    app.router.add_route("*", "/api/echo{tail:.*}", echo)
    return app


async def start(host: str = "127.0.0.1", port: int = 8081) -> web.AppRunner:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    args = parser.parse_args()

    async def serve() -> None:
        runner = await start(args.host, args.port)
        print(f"sample upstream on http://{args.host}:{args.port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
