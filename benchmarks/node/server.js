// The Node stack the gateway replaces, as `python -m benchmarks` runs it next to the gateway:
// express + helmet + express-rate-limit (rate-limit-redis) + http-proxy-middleware, with jose for
// RS256 JWTs from a JWKS, sanitize-html + validator for bodies and prom-client for metrics.
// The runner installs package.json into a scratch folder, copies this file there and starts it
// with its settings in the environment; one process, one core, like the gateway under test.
//
//   GET  /pass        proxy only                                          (profile: passthrough)
//   GET  /api/items   helmet, JWT (jose, JWKS), 2 Redis limits (user, ip), CDN headers,
//                     prom-client histogram, JSON access log, proxy          (profile: api)
//   POST /api/users   express.json, sanitize-html on strings holding '<', validator field
//                     rules (422), proxy with the re-serialised body         (profile: post)
//   GET  /api/flood   10 per minute per ip in Redis, proxy                   (profile: flood)
//   GET  /metrics     prom-client exposition
//
// Environment: PORT, UPSTREAM (http://127.0.0.1:PORT), REDIS_URL, JWKS_URL, ISSUER, AUDIENCE,
// HIGH (a limit nothing reaches), FLOOD_LIMIT, FLOOD_WINDOW_MS.

import http from 'node:http'
import express from 'express'
import helmet from 'helmet'
import { rateLimit } from 'express-rate-limit'
import { RedisStore } from 'rate-limit-redis'
import { createClient } from 'redis'
import { createProxyMiddleware, fixRequestBody } from 'http-proxy-middleware'
import { createRemoteJWKSet, jwtVerify } from 'jose'
import sanitizeHtml from 'sanitize-html'
import validator from 'validator'
import client from 'prom-client'

const env = process.env
const PORT = Number(env.PORT || 3000)
const UPSTREAM = env.UPSTREAM || 'http://127.0.0.1:8081'
const HIGH = Number(env.HIGH || 10000000)
const FLOOD_LIMIT = Number(env.FLOOD_LIMIT || 10)
const FLOOD_WINDOW_MS = Number(env.FLOOD_WINDOW_MS || 60000)

const redis = createClient({ url: env.REDIS_URL || 'redis://127.0.0.1:6379' })
redis.on('error', (error) => console.error(JSON.stringify({ level: 'error', message: `redis: ${error.message}` })))
await redis.connect()

const store = (prefix) => new RedisStore({ sendCommand: (...args) => redis.sendCommand(args), prefix })
const problem = (res, status, detail, extra = {}) =>
  res.status(status).type('application/problem+json').set('Cache-Control', 'no-store').send(JSON.stringify({ status, detail, ...extra }))

// One keep-alive pool towards the upstream, shared by every route (as the gateway has one per upstream).
const agent = new http.Agent({ keepAlive: true, maxSockets: 100, keepAliveMsecs: 15000 })
const proxyFailed = (error, req, res) => {
  console.error(JSON.stringify({ level: 'error', message: `proxy: ${error.code || ''} ${error.message}`, path: req.url }))
  if (!res.headersSent) problem(res, 502, 'the upstream could not be reached')
}
const proxy = ({ on = {}, ...extra } = {}) =>
  createProxyMiddleware({ target: UPSTREAM, agent, xfwd: true, on: { error: proxyFailed, ...on }, ...extra })

const app = express()
app.disable('x-powered-by')
app.disable('etag')
app.set('trust proxy', false)

// --- passthrough -------------------------------------------------------------------------------
app.get('/pass', proxy())

// --- api: everything a real API route has --------------------------------------------------------
const registry = new client.Registry()
const duration = new client.Histogram({
  name: 'http_request_duration_seconds',
  help: 'Time from the request head to the end of the response.',
  labelNames: ['method', 'route', 'status_code'],
  buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
  registers: [registry],
})
const observe = (route) => (req, res, next) => {
  const started = process.hrtime.bigint()
  res.on('finish', () => {
    const seconds = Number(process.hrtime.bigint() - started) / 1e9
    duration.labels(req.method, route, String(res.statusCode)).observe(seconds)
    // The access log: one JSON line per request on stdout, as the gateway writes its own.
    process.stdout.write(JSON.stringify({
      time: new Date().toISOString(), method: req.method, path: req.path, route, status: res.statusCode,
      duration_ms: Math.round(seconds * 1e6) / 1000, user: req.user?.sub ?? null, client_ip: req.ip,
      bytes_out: Number(res.getHeader('content-length') || 0),
    }) + '\n')
  })
  next()
}

const jwks = createRemoteJWKSet(new URL(env.JWKS_URL || 'http://127.0.0.1:8082/jwks.json'))
const authenticate = ({ roles = [], scopes = [] }) => async (req, res, next) => {
  const [scheme, token] = (req.get('authorization') || '').split(' ')
  if (scheme?.toLowerCase() !== 'bearer' || !token) {
    res.set('WWW-Authenticate', 'Bearer realm="gateway"')
    return problem(res, 401, 'a bearer token is required')
  }
  let claims
  try {
    ;({ payload: claims } = await jwtVerify(token, jwks, {
      issuer: env.ISSUER, audience: env.AUDIENCE, algorithms: ['RS256'], requiredClaims: ['exp', 'sub'], clockTolerance: 30,
    }))
  } catch {
    res.set('WWW-Authenticate', 'Bearer realm="gateway", error="invalid_token"')
    return problem(res, 401, 'the token is not valid')
  }
  const granted = Array.isArray(claims.roles) ? claims.roles : String(claims.roles || '').split(' ')
  const scope = String(claims.scope || '').split(' ')
  if ((roles.length && !roles.some((r) => granted.includes(r))) || !scopes.every((s) => scope.includes(s))) {
    res.set('WWW-Authenticate', 'Bearer realm="gateway", error="insufficient_scope"')
    return problem(res, 403, 'the token does not grant this')
  }
  req.user = claims
  next()
}
const cdn = (req, res, next) => {
  // What the gateway's cdn policy sends for an authenticated GET: private, the CDN headers left out.
  res.set('Cache-Control', 'private, max-age=60')
  res.vary('Accept-Encoding')
  next()
}
const stripLeaks = (proxyRes) => {
  for (const name of ['server', 'x-powered-by', 'x-aspnet-version', 'x-aspnetmvc-version']) delete proxyRes.headers[name]
}
app.get(
  '/api/items',
  observe('api'),
  helmet(),
  authenticate({ roles: ['user'], scopes: ['profile:read'] }),
  // express-rate-limit has fixed windows only; each limiter is one Redis round trip (EVALSHA).
  rateLimit({ windowMs: 60000, limit: HIGH, keyGenerator: (req) => `user:${req.user.sub}`, store: store('rl-user:'), standardHeaders: 'draft-8', legacyHeaders: false, identifier: 'user' }),
  rateLimit({ windowMs: 1000, limit: HIGH, store: store('rl-ip:'), standardHeaders: 'draft-8', legacyHeaders: false, identifier: 'ip' }),
  cdn,
  proxy({
    on: {
      // A request whose client left (wrk stopping) may already be flushed when this runs;
      // setting a header then throws and ended the whole process mid-benchmark.
      proxyReq: (proxyReq, req) => { if (!proxyReq.headersSent) proxyReq.setHeader('X-User-Id', req.user.sub) },
      proxyRes: stripLeaks,
    },
  }),
)

// --- post: sanitize + validate -------------------------------------------------------------------
// The same fast path as the gateway: a string without '<' cannot hold markup, so sanitize-html is
// called only for strings that have one.
const clean = (value) => {
  if (typeof value === 'string') return value.includes('<') ? sanitizeHtml(value, { allowedTags: [], allowedAttributes: {} }) : value
  if (Array.isArray(value)) return value.map(clean)
  if (value && typeof value === 'object') {
    for (const key of Object.keys(value)) value[key] = clean(value[key])
    return value
  }
  return value
}
const rules = [
  // The field rules of benchmarks.sanitize.VALIDATE_FIELDS, written with validator.js.
  ['seller.email', (b) => typeof b.seller?.email === 'string' && validator.isEmail(b.seller.email), 'format'],
  ['name', (b) => typeof b.name === 'string' && b.name.length <= 200, 'type/max_length'],
  ['description', (b) => b.description === undefined || (typeof b.description === 'string' && b.description.length <= 8000), 'type/max_length'],
  ['tags', (b) => b.tags === undefined || (Array.isArray(b.tags) && b.tags.length <= 20), 'type/max_length'],
  ['price.amount', (b) => b.price?.amount === undefined || (typeof b.price.amount === 'number' && b.price.amount >= 0), 'type/minimum'],
  ['variants[].sku', (b) => !Array.isArray(b.variants) || b.variants.every((v) => v.sku === undefined || (typeof v.sku === 'string' && v.sku.length <= 24)), 'type/max_length'],
]
const validate = (req, res, next) => {
  const body = req.body
  if (!body || typeof body !== 'object' || Array.isArray(body)) return problem(res, 422, 'a JSON object is required')
  const errors = rules.filter(([, ok]) => !ok(body)).map(([field, , rule]) => ({ field, rule }))
  if (errors.length) return problem(res, 422, `invalid fields: ${errors.map((e) => e.field).join(', ')}`, { errors })
  next()
}
app.post(
  '/api/users',
  express.json({ limit: '1mb', type: ['application/json', 'application/*+json'] }),
  (req, res, next) => { req.body = clean(req.body); next() },
  validate,
  proxy({ on: { proxyReq: fixRequestBody } }),
)

// --- flood: one client over its limit --------------------------------------------------------------
app.get(
  '/api/flood',
  rateLimit({ windowMs: FLOOD_WINDOW_MS, limit: FLOOD_LIMIT, store: store('rl-flood:'), standardHeaders: 'draft-8', legacyHeaders: false }),
  proxy(),
)

app.get('/metrics', async (req, res) => res.type(registry.contentType).send(await registry.metrics()))
app.use((req, res) => problem(res, 404, 'no route matches this path'))
app.use((error, req, res, next) => {
  console.error(JSON.stringify({ level: 'error', message: String(error?.stack || error) }))
  if (res.headersSent) return next(error)
  problem(res, error.status || 500, error.expose ? error.message : 'internal error')
})

const server = app.listen(PORT, '127.0.0.1', () => console.error(JSON.stringify({ level: 'info', message: `listening on 127.0.0.1:${PORT}` })))
server.keepAliveTimeout = 75000
server.headersTimeout = 76000
const stop = () => {
  server.close()
  redis.quit().catch(() => {}).finally(() => process.exit(0))
  setTimeout(() => process.exit(0), 2000).unref()
}
process.on('SIGTERM', stop)
process.on('SIGINT', stop)
