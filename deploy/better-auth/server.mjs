// The companion Better Auth server that hatchd verifies API keys against.
//
// Configured only by environment variables (see README.md):
//   PORT                default 3000
//   HOST                default 127.0.0.1
//   DATABASE_PATH       SQLite file, default ./better-auth.db
//   BETTER_AUTH_SECRET  signing/encryption secret; when unset, one is generated at
//                       first start and kept in "<DATABASE_PATH>.secret" (mode 0600)
//   BETTER_AUTH_URL     this server's own base URL, default http://HOST:PORT
//   LOG_LEVEL           debug, info, warn (default) or error
//
// Routes:
//   /api/auth/*               Better Auth's own API (email+password, API-key plugin)
//   POST /api/hatch/verify-key {"key": "..."} -> {"valid": true, "userId": "..."} | {"valid": false}
//   GET  /healthz             200 once the schema is in place and the server listens
import { randomBytes } from "node:crypto";
import { readFileSync, writeFileSync, mkdirSync } from "node:fs";
import { createServer } from "node:http";
import path from "node:path";

import { apiKey } from "@better-auth/api-key";
import Database from "better-sqlite3";
import { betterAuth } from "better-auth";
import { getMigrations } from "better-auth/db/migration";
import { toNodeHandler } from "better-auth/node";

const PORT = Number.parseInt(process.env.PORT || "3000", 10);
const HOST = process.env.HOST || "127.0.0.1";
const DATABASE_PATH = path.resolve(process.env.DATABASE_PATH || "./better-auth.db");
const BASE_URL = process.env.BETTER_AUTH_URL || `http://${HOST.includes(":") ? `[${HOST}]` : HOST}:${PORT}`;
const VERIFY_PATH = "/api/hatch/verify-key";
const MAX_BODY = 16 * 1024;
const PEER_HEADER = "x-hatch-peer-address";

function log(message) {
  process.stderr.write(`better-auth: ${message}\n`);
}

// Better Auth's logger, one plain line per message. Its arguments are summarised (an error by
// its message and code), never dumped whole. The API-key plugin reports every rejected key
// ("Failed to validate API key") as an error; a wrong, disabled or expired key is ordinary
// traffic, so that is logged at info level, which the default level (warn) leaves out.
function summarise(arg) {
  if (arg instanceof Error || arg?.name === "APIError") {
    const code = arg.body?.code ?? arg.code;
    return `${arg.name}: ${arg.message}${code ? ` (${code})` : ""}`;
  }
  return typeof arg === "string" ? arg : JSON.stringify(arg);
}
const LOG_LEVEL = process.env.LOG_LEVEL || "warn";
const LEVELS = ["debug", "info", "warn", "error"];
function authLog(level, message, ...args) {
  if (level === "error" && message.startsWith("Failed to validate API key") && args[0]?.status === "UNAUTHORIZED") level = "info";
  if (LEVELS.indexOf(level) < LEVELS.indexOf(LOG_LEVEL)) return;
  log(`${level} ${[message, ...args.map(summarise)].join(" ")}`);
}

// The secret: from the environment, else from the file beside the database, else a new one
// written there (created exclusively, so two first starts cannot each write their own).
function loadSecret() {
  if (process.env.BETTER_AUTH_SECRET) return process.env.BETTER_AUTH_SECRET;
  const file = `${DATABASE_PATH}.secret`;
  try {
    return readFileSync(file, "utf8").trim();
  } catch (error) {
    if (error.code !== "ENOENT") throw error;
  }
  const secret = randomBytes(32).toString("base64url");
  try {
    writeFileSync(file, `${secret}\n`, { mode: 0o600, flag: "wx" });
    log(`generated a secret in ${file}`);
    return secret;
  } catch (error) {
    if (error.code !== "EEXIST") throw error;
    return readFileSync(file, "utf8").trim();
  }
}

mkdirSync(path.dirname(DATABASE_PATH), { recursive: true });
const db = new Database(DATABASE_PATH);
db.pragma("journal_mode = WAL");
db.pragma("busy_timeout = 5000");

const options = {
  appName: "hatchvm",
  baseURL: BASE_URL,
  secret: loadSecret(),
  database: db,
  emailAndPassword: { enabled: true },
  telemetry: { enabled: false },
  logger: { level: "debug", log: authLog },
  // Better Auth takes the client's address only from headers. This server sets its own
  // header to the TCP peer's address (whatever a client sent in it is overwritten), so the
  // per-IP limiter and the sessions' ipAddress see the real peer, not one shared bucket.
  advanced: { ipAddress: { ipAddressHeaders: [PEER_HEADER] } },
  rateLimit: {
    // Better Auth's own per-IP limiter (on when NODE_ENV=production) stays as it is for
    // sign-in/sign-up, but not for get-session: hatchd asks it from one address for all
    // its users, and what a key may do is the API-key plugin's business, below.
    customRules: { "/get-session": false },
  },
  plugins: [
    apiKey({
      // GET /api/auth/get-session with "x-api-key: <key>" answers the key owner's session.
      enableSessionForAPIKeys: true,
      // The plugin's default allows a key 10 verifications a day, after which every request
      // with it fails until the day is over: a key used for real work would stop working.
      // hatchd caches successful verifications, so it asks rarely, but a key must never be
      // cut off because it is busy. Usage limits belong to hatchd, not to key verification.
      // Off here means off for every key (the plugin checks this before a key's own
      // rateLimitEnabled/rateLimitMax), and new keys are stored with rateLimitEnabled=false.
      rateLimit: { enabled: false },
    }),
  ],
};

const auth = betterAuth(options);

// The schema: Better Auth's own migration planner, run in-process at every start. It
// creates the missing tables and columns and does nothing when they are all there.
const { toBeCreated, toBeAdded, runMigrations } = await getMigrations(options);
if (toBeCreated.length || toBeAdded.length) {
  await runMigrations();
  log(`schema migrated (${toBeCreated.map((t) => t.table).join(", ") || "columns added"})`);
}

function sendJson(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(data) });
  res.end(data);
}

async function readBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY) return null;
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString("utf8");
}

// POST /api/hatch/verify-key: the key is checked with the plugin's server-side verification
// (same checks as get-session: exists, enabled, not expired, not exhausted). The key is never
// logged nor sent back.
async function verifyKey(req, res) {
  if (req.method !== "POST") {
    res.setHeader("allow", "POST");
    return sendJson(res, 405, { error: "method not allowed" });
  }
  const raw = await readBody(req);
  let key;
  try {
    key = raw === null ? undefined : JSON.parse(raw)?.key;
  } catch {
    key = undefined;
  }
  if (typeof key !== "string") return sendJson(res, 400, { error: 'expected a JSON body {"key": "<api key>"}' });
  if (key === "") return sendJson(res, 200, { valid: false });
  const result = await auth.api.verifyApiKey({ body: { key } });
  if (result.valid && result.key?.referenceId) return sendJson(res, 200, { valid: true, userId: result.key.referenceId });
  return sendJson(res, 200, { valid: false });
}

const authHandler = toNodeHandler(auth);

const server = createServer((req, res) => {
  const pathname = (req.url || "/").split("?", 1)[0];
  let handling;
  if (pathname === "/healthz") handling = Promise.resolve(sendJson(res, 200, { ok: true }));
  else if (pathname === VERIFY_PATH) handling = verifyKey(req, res);
  else if (pathname === "/api/auth" || pathname.startsWith("/api/auth/")) {
    req.headers[PEER_HEADER] = req.socket.remoteAddress ?? "";
    handling = authHandler(req, res);
  }
  else handling = Promise.resolve(sendJson(res, 404, { error: "not found" }));
  handling.catch((error) => {
    log(`error on ${req.method} ${pathname}: ${error?.message ?? error}`);
    if (!res.headersSent) sendJson(res, 500, { error: "internal error" });
    else res.destroy();
  });
});
server.keepAliveTimeout = 5000;

let stopping = false;
function shutdown(signal) {
  if (stopping) return;
  stopping = true;
  log(`${signal}: stopping`);
  server.close(() => {
    db.close();
    process.exit(0);
  });
  server.closeIdleConnections();
  // Requests still running get a few seconds, then the process goes anyway.
  setTimeout(() => {
    server.closeAllConnections();
    db.close();
    process.exit(0);
  }, 5000).unref();
}
process.on("SIGTERM", () => shutdown("SIGTERM"));
process.on("SIGINT", () => shutdown("SIGINT"));

server.listen(PORT, HOST, () => {
  const address = server.address();
  log(`listening on ${typeof address === "string" ? address : `${address.address}:${address.port}`} (base URL ${BASE_URL}, database ${DATABASE_PATH})`);
});
