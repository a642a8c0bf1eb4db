// Verify a certbroker evidence document with stock Node.js (>= 16) and nothing else:
//   node docs/evidence-verify.mjs JWKS EVIDENCE
// The same checks, in the same order and with the same exit codes, as steps 1-4 of
// `certbroker evidence verify` (docs/evidence.md): 0 intact, 10 content changed,
// 11 signature bad, 12 unknown key, 14 malformed. (The audit-log proof, step 5, is left out.)
import { readFileSync } from 'node:fs';
import { createHash, createPublicKey, verify } from 'node:crypto';

const [jwksPath, evidencePath] = process.argv.slice(2);
const done = (code, text) => { console.log(text); process.exit(code); };

// Canonical JSON: object keys sorted (all ASCII), no whitespace, non-ASCII raw: what
// Python's json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False) writes.
const canonical = (v) => Array.isArray(v) ? `[${v.map(canonical).join(',')}]`
  : v !== null && typeof v === 'object'
    ? `{${Object.keys(v).sort().map((k) => `${JSON.stringify(k)}:${canonical(v[k])}`).join(',')}}`
    : JSON.stringify(v);
const sha256 = (...parts) => { const h = createHash('sha256'); parts.forEach((p) => h.update(p)); return h.digest('hex'); };
const b64url = (t) => Buffer.from(t, 'base64url');

let header, payload, parts;
try {
  parts = readFileSync(evidencePath, 'utf8').trim().split('.');
  if (parts.length !== 3) throw new Error('not three parts');
  header = JSON.parse(b64url(parts[0]).toString('utf8'));
  payload = JSON.parse(b64url(parts[1]).toString('utf8'));
  if (header.alg !== 'EdDSA' || !Array.isArray(payload.items)) throw new Error('not evidence');
} catch (e) { done(14, `malformed: ${e.message}`); }

const jwk = JSON.parse(readFileSync(jwksPath, 'utf8')).keys.find((k) => k.kid === header.kid);
if (!jwk) done(12, `unknown key ${header.kid}`);

for (const [i, item] of payload.items.entries()) {
  const salt = b64url(item.salt);
  const names = [...new Set([...Object.keys(item.content), ...Object.keys(item.digests)])].sort();
  for (const name of names) {
    const d = name in item.content ? sha256(salt, Buffer.from(canonical([name, item.content[name]]), 'utf8')) : null;
    if (d !== item.digests[name]) done(10, `item ${i + 1}: field ${name} changed`);
  }
  if (sha256(Buffer.from(canonical(item.digests), 'utf8')) !== item.content_digest) done(10, `item ${i + 1}: digests changed`);
}

const key = createPublicKey({ key: { kty: jwk.kty, crv: jwk.crv, x: jwk.x }, format: 'jwk' });
if (!verify(null, Buffer.from(`${parts[0]}.${parts[1]}`, 'ascii'), key, b64url(parts[2]))) done(11, 'signature bad');
done(0, `intact: evidence ${payload.evidence_id}, ${payload.items.length} records, key ${header.kid}`);
