"""What verifying a JWT costs the gateway per request, with and without the verified-token memory.

    python -m benchmarks.jwt_verify [--seconds 2]

Runs the auth policy's own verifier (gateway.policies.auth.Authenticator) in-process on
tokens signed with RS256 (2048-bit) and ES256 (P-256), keys given as PEM files, and reports CPU
microseconds per request (process time, so a busy machine slows the run but not the figure)
for: a new token every request (a full signature check), and the same token repeated (the
memory answers). Nothing leaves the process.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.policies.auth import Authenticator, AuthGlobal

ALGORITHMS = {
    "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
}


def _pem(private_key: Any, folder: Path, name: str) -> str:
    path = folder / f"{name}.pem"
    path.write_bytes(
        private_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return path.name


def _tokens(private_key: Any, algorithm: str, count: int) -> list[str]:
    expires = int(time.time()) + 3600
    return [
        jwt.encode({"sub": str(i), "aud": "bench", "iss": "bench", "exp": expires}, private_key, algorithm=algorithm)
        for i in range(count)
    ]


async def _measure(authenticator: Authenticator, tokens: list[str], seconds: float) -> tuple[float, int]:
    """CPU µs per verify, cycling through the tokens for about ``seconds`` of wall time."""
    done = 0
    started_cpu = time.process_time()
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for token in tokens:
            await authenticator.verify(token)
        done += len(tokens)
    return (time.process_time() - started_cpu) / done * 1e6, done


async def run(seconds: float) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        for algorithm, make_key in ALGORITHMS.items():
            private_key = make_key()
            issuer = {"issuer": "bench", "audience": "bench", "algorithms": [algorithm], "public_key": _pem(private_key, folder, algorithm)}
            fresh = _tokens(private_key, algorithm, 2000)
            for memory, cache_size, tokens in (("off", 0, fresh), ("on, same token", 10000, fresh[:1])):
                settings = AuthGlobal.model_validate({"jwt": issuer, "cache_size": cache_size}, context={"base_dir": folder})
                authenticator = Authenticator(settings)
                cpu_us, requests = await _measure(authenticator, tokens, seconds)
                rows.append({"algorithm": algorithm, "memory": memory, "cpu_us_per_request": round(cpu_us, 2), "requests": requests})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="wall time per measurement")
    args = parser.parse_args()
    rows = asyncio.run(run(args.seconds))
    print(f"{'algorithm':<10} {'token memory':<16} {'CPU µs/request':>15} {'requests':>10}")
    for row in rows:
        print(f"{row['algorithm']:<10} {row['memory']:<16} {row['cpu_us_per_request']:>15.2f} {row['requests']:>10}")
    by = {(r["algorithm"], r["memory"]): r["cpu_us_per_request"] for r in rows}
    for algorithm in ALGORITHMS:
        ratio = by[(algorithm, "off")] / by[(algorithm, "on, same token")]
        print(f"{algorithm}: the memory makes a repeated token {ratio:.0f}x cheaper")


if __name__ == "__main__":
    main()
