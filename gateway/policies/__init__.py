"""The policy registry.

The order of POLICIES is the order of every route's request chain (DESIGN.md: CORS preflight →
rate limit → auth → validate/sanitize → cache); response hooks run in reverse. Adding a policy is
one module in this package and one line here: its ``name`` becomes a per-route config block (also
allowed under ``defaults``), validated by its ``settings_type``.
"""

from __future__ import annotations

from gateway.pipeline import Policy
from gateway.policies.cache import CachePolicy
from gateway.policies.auth import AuthPolicy
from gateway.policies.cdn import CdnPolicy
from gateway.policies.cors import CorsPolicy
from gateway.policies.headers import SecurityHeadersPolicy
from gateway.policies.ratelimit import RateLimitPolicy
from gateway.policies.sanitize import SanitizePolicy
from gateway.policies.validate import ValidatePolicy
from gateway.policies.warm import WarmPolicy

# Response hooks run bottom-up: the cache stores what the upstream said, cdn sets caching
# headers, security_headers may keep those (keep_upstream), and CORS answers last.
POLICIES: tuple[type[Policy], ...] = (
    CorsPolicy,
    SecurityHeadersPolicy,
    CdnPolicy,
    RateLimitPolicy,  # before auth: floods of bad tokens stop here (limits keyed by user run after auth)
    AuthPolicy,
    SanitizePolicy,  # rewrites bodies first, so validate checks what the upstream will get
    ValidatePolicy,
    CachePolicy,  # a hit answers after every check; its response hook runs first (stores what the upstream said)
    WarmPolicy,  # no hooks: a route's warm list, fetched through the gateway at start and every warm.every
)
