// sigstore-js, driven by the mirror's tests: sign image digests into sigstore bundles with
// a key of the test's own (@sigstore/sign, no Fulcio, no Rekor), and verify bundles the way
// a client does (@sigstore/verify with the trusted keys, then the in-toto subject against
// the image digest, as cosign and policy-controller do).
//
// Reads one JSON array of requests on stdin, writes one JSON array of results on stdout:
//   {"op": "sign", "kind": "dsse" | "message", "key": PEM private key, "hint": name,
//    "digest": "sha256:...", "manifest_b64": the manifest's bytes (message signatures),
//    "statement_b64": optional, the in-toto statement a DSSE bundle signs (default: cosign
//    v3's signature statement of "digest")}
//     -> {"bundle": serialised bundle}
//   {"op": "verify", "bundle": ..., "keys": {hint: PEM public key}, "digest": "sha256:...",
//    "manifest_b64": ...}
//     -> {"ok": true} | {"ok": false, "error": "..."}
//   {"op": "keyless", "signings": [{"issuer": URL, "subject": SAN URI, "digest": ...,
//                                   "statement_b64": optional, as for "sign"}]}
//     -> {"trusted_root": ..., "bundles": [...]}: @sigstore/mock's Fulcio CA (with its CT
//        log) and Rekor, served on a loopback port, sign through @sigstore/sign's Fulcio
//        signer and Rekor witness; the trusted root holds the mock's CA, Rekor and CT keys
//   {"op": "verify_keyless", "bundle": ..., "trusted_root": ..., "issuer": ...,
//    "subject": ..., "digest": ...} -> {"ok": ...}
import crypto from "node:crypto";
import http from "node:http";
import { bundleFromJSON, bundleToJSON } from "@sigstore/bundle";
import {
  fulcioHandler, initializeCA, initializeCTLog, initializeTLog, rekorHandler,
} from "@sigstore/mock";
import { TrustedRoot } from "@sigstore/protobuf-specs";
import { DSSEBundleBuilder, FulcioSigner, MessageSignatureBundleBuilder, RekorWitness }
  from "@sigstore/sign";
import { Verifier, toSignedEntity, toTrustMaterial } from "@sigstore/verify";

const IN_TOTO = "application/vnd.in-toto+json";

function keySigner(privatePem, hint) {
  const key = crypto.createPrivateKey(privatePem);
  const publicKey = crypto.createPublicKey(key).export({ format: "pem", type: "spki" });
  // SHA-256 whatever the key (as cosign 2 does, and as @sigstore/verify expects)
  const algorithm = key.asymmetricKeyType === "ed25519" ? null : "sha256";
  return {
    sign: async (data) => ({
      signature: crypto.sign(algorithm, data, key),
      key: { $case: "publicKey", publicKey, hint },
    }),
  };
}

function statement(digest) {
  return Buffer.from(JSON.stringify({
    _type: "https://in-toto.io/Statement/v1",
    subject: [{ name: "image", digest: { sha256: digest.replace(/^sha256:/, "") } }],
    predicateType: "https://sigstore.dev/cosign/sign/v1",
    predicate: {},
  }));
}

async function sign(req) {
  const signer = keySigner(req.key, req.hint);
  if (req.kind === "message") {
    const builder = new MessageSignatureBundleBuilder({ signer, witnesses: [] });
    const bundle = await builder.create({ data: Buffer.from(req.manifest_b64, "base64") });
    return { bundle: bundleToJSON(bundle) };
  }
  const builder = new DSSEBundleBuilder({ signer, witnesses: [] });
  // statement_b64: a statement made by the test (e.g. a vulnerability attestation)
  const data = req.statement_b64 ? Buffer.from(req.statement_b64, "base64")
    : statement(req.digest);
  const bundle = await builder.create({ data, type: IN_TOTO });
  return { bundle: bundleToJSON(bundle) };
}

function verify(req) {
  const keys = {};
  for (const [hint, pem] of Object.entries(req.keys)) {
    keys[hint] = { rawBytes: crypto.createPublicKey(pem).export({ format: "der", type: "spki" }),
                   keyDetails: 0, validFor: { start: new Date(0) } };
  }
  const root = { mediaType: "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
                 tlogs: [], certificateAuthorities: [], ctlogs: [], timestampAuthorities: [] };
  const verifier = new Verifier(toTrustMaterial(root, (hint) => {
    const key = keys[hint];
    if (!key) throw new Error(`no key for hint ${hint}`);
    return { publicKey: crypto.createPublicKey({ key: Buffer.from(key.rawBytes),
                                                  format: "der", type: "spki" }),
             validFor: () => true };
  }), { tlogThreshold: 0, ctlogThreshold: 0, timestampThreshold: 0 });
  try {
    const bundle = bundleFromJSON(req.bundle);
    const artifact = req.manifest_b64 ? Buffer.from(req.manifest_b64, "base64") : undefined;
    verifier.verify(toSignedEntity(bundle, artifact));
    if (bundle.content.$case === "dsseEnvelope") {
      checkSubject(bundle, req.digest);
    } else {
      // the bundle must name the artifact it signs, as the in-toto subject does
      const named = Buffer.from(bundle.content.messageSignature.messageDigest.digest);
      const actual = crypto.createHash("sha256").update(artifact).digest();
      if (!named.equals(actual)) throw new Error("the bundle names another digest");
    }
    return { ok: true };
  } catch (err) {
    return { ok: false, error: String(err && err.message ? err.message : err) };
  }
}

function checkSubject(bundle, digest) {
  const envelope = bundle.content.dsseEnvelope;
  if (envelope.payloadType !== IN_TOTO) throw new Error("not an in-toto statement");
  const st = JSON.parse(Buffer.from(envelope.payload).toString());
  const hex = digest.replace(/^sha256:/, "");
  if (!st.subject.some((s) => s.digest && s.digest.sha256 === hex)) {
    throw new Error("the statement's subject is another digest");
  }
}

function unsignedJwt(claims) {
  const part = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  return `${part({ alg: "none", typ: "JWT" })}.${part(claims)}.`;
}

// serve handlers ({path, fn}) on a loopback port; returns the base URL and a closer
async function serve(handlers) {
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", async () => {
      const handler = handlers.find((h) => req.url.startsWith(h.path));
      if (!handler) { res.writeHead(404); res.end(); return; }
      const { statusCode, response, contentType } =
        await handler.fn(Buffer.concat(chunks).toString());
      res.writeHead(statusCode, { "Content-Type": contentType || "text/plain" });
      res.end(response);
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { url: `http://127.0.0.1:${server.address().port}`,
           close: () => new Promise((resolve) => server.close(resolve)) };
}

function ecKeyPair() {
  return crypto.generateKeyPairSync("ec", { namedCurve: "P-256" });
}

function logKey(der, url) {
  return {
    baseUrl: url, hashAlgorithm: "SHA2_256",
    publicKey: { rawBytes: Buffer.from(der).toString("base64"),
                 keyDetails: "PKIX_ECDSA_P256_SHA_256",
                 validFor: { start: "2000-01-01T00:00:00Z" } },
    logId: { keyId: crypto.createHash("sha256").update(Buffer.from(der)).digest("base64") },
  };
}

async function keyless(req) {
  const ctlog = await initializeCTLog(ecKeyPair());
  const ca = await initializeCA(ecKeyPair(), ctlog);
  const tlogKeys = ecKeyPair();
  const fulcio = await serve([fulcioHandler(ca)]);
  const rekorPlaceholder = "http://rekor.mock";
  const tlog = await initializeTLog(rekorPlaceholder, tlogKeys);
  const rekor = await serve([rekorHandler(tlog)]);
  try {
    const bundles = [];
    for (const signing of req.signings) {
      const token = unsignedJwt({ iss: signing.issuer, sub: signing.subject,
                                  aud: "sigstore", exp: Math.floor(Date.now() / 1000) + 600 });
      const signer = new FulcioSigner({ fulcioBaseURL: fulcio.url,
                                        identityProvider: { getToken: async () => token } });
      const builder = new DSSEBundleBuilder({
        signer, witnesses: [new RekorWitness({ rekorBaseURL: rekor.url, entryType: "intoto" })] });
      const data = signing.statement_b64 ? Buffer.from(signing.statement_b64, "base64")
        : statement(signing.digest);
      const bundle = await builder.create({ data, type: IN_TOTO });
      bundles.push(bundleToJSON(bundle));
    }
    const root = {
      mediaType: "application/vnd.dev.sigstore.trustedroot+json;version=0.1",
      tlogs: [logKey(tlog.publicKey, rekorPlaceholder)],
      certificateAuthorities: [{
        subject: { organization: "sigstore.mock", commonName: "sigstore" },
        uri: fulcio.url,
        certChain: { certificates: [
          { rawBytes: Buffer.from(ca.rootCertificate).toString("base64") }] },
        validFor: { start: "2000-01-01T00:00:00Z" },
      }],
      ctlogs: [logKey(ctlog.publicKey, "http://ctfe.mock")],
      timestampAuthorities: [],
    };
    return { trusted_root: root, bundles };
  } finally {
    await fulcio.close();
    await rekor.close();
  }
}

function verifyKeyless(req) {
  try {
    const material = toTrustMaterial(TrustedRoot.fromJSON(req.trusted_root));
    const verifier = new Verifier(material, { tlogThreshold: 1, ctlogThreshold: 1,
                                              timestampThreshold: 1 });
    const bundle = bundleFromJSON(req.bundle);
    verifier.verify(toSignedEntity(bundle), {
      subjectAlternativeName: req.subject, extensions: { issuer: req.issuer } });
    checkSubject(bundle, req.digest);
    return { ok: true };
  } catch (err) {
    return { ok: false, error: String(err && err.message ? err.message : err) };
  }
}

const OPS = { sign, verify, keyless, verify_keyless: verifyKeyless };

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const results = [];
for (const req of JSON.parse(Buffer.concat(chunks).toString())) {
  results.push(await OPS[req.op](req));
}
process.stdout.write(JSON.stringify(results));
