// sigstore-js, driven by the mirror's tests: sign image digests into sigstore bundles with
// a key of the test's own (@sigstore/sign, no Fulcio, no Rekor), and verify bundles the way
// a client does (@sigstore/verify with the trusted keys, then the in-toto subject against
// the image digest, as cosign and policy-controller do).
//
// Reads one JSON array of requests on stdin, writes one JSON array of results on stdout:
//   {"op": "sign", "kind": "dsse" | "message", "key": PEM private key, "hint": name,
//    "digest": "sha256:...", "manifest_b64": the manifest's bytes (message signatures)}
//     -> {"bundle": serialised bundle}
//   {"op": "verify", "bundle": ..., "keys": {hint: PEM public key}, "digest": "sha256:...",
//    "manifest_b64": ...}
//     -> {"ok": true} | {"ok": false, "error": "..."}
import crypto from "node:crypto";
import { bundleFromJSON, bundleToJSON } from "@sigstore/bundle";
import { DSSEBundleBuilder, MessageSignatureBundleBuilder } from "@sigstore/sign";
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
  const bundle = await builder.create({ data: statement(req.digest), type: IN_TOTO });
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
      const envelope = bundle.content.dsseEnvelope;
      if (envelope.payloadType !== IN_TOTO) throw new Error("not an in-toto statement");
      const st = JSON.parse(Buffer.from(envelope.payload).toString());
      const hex = req.digest.replace(/^sha256:/, "");
      if (!st.subject.some((s) => s.digest && s.digest.sha256 === hex)) {
        throw new Error("the statement's subject is another digest");
      }
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

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const results = [];
for (const req of JSON.parse(Buffer.concat(chunks).toString())) {
  results.push(req.op === "sign" ? await sign(req) : verify(req));
}
process.stdout.write(JSON.stringify(results));
