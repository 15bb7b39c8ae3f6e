// Native crypto for the gateway's hot path (issue: sealed hot path at hardware speed).
//
// AES-256-GCM writing straight into the output buffer; X25519 and Ed25519 on raw 32-byte keys.
// AES-GCM keeps no object per key: JS passes the 32-byte key with every call, and each thread
// caches a bounded table of OpenSSL contexts loaded with the keys last used (below). A context
// per connection had cost ~1.9 KiB of native memory each, two per connection: most of an idle
// connection's memory (docs/ARCHITECTURE.md, "Memory"). Built by node-gyp against Node's own
// headers; the OpenSSL symbols are Node's own (the binary exports them), so no system libssl is
// linked.
//
// Every bad input is a JS exception or a false result, never a crash: a key is only bytes, so
// any 32 bytes are a key (the wrong one at worst), never a pointer.
#include <napi.h>
#include <new>
#include <climits>
#include <cstdint>
#include <openssl/evp.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <cstring>

namespace {

constexpr size_t kKey = 32;
constexpr size_t kIv = 12;
constexpr size_t kTag = 16;
// The most bytes one call seals or opens: OpenSSL's EVP update takes an int length, and OpenSSL
// 3.0's provider path takes a negative one as a size_t, so 2^31 bytes ran past both buffers (a
// segfault after gigabytes written). JS bounds frames far below this (MAX_AEAD_BYTES in
// protocol/crypto/backend.ts); this holds for any caller of the addon.
constexpr size_t kMaxData = INT_MAX;

// A Uint8Array argument's bytes and length, read with one look-up (type, length and bytes at
// once); false for anything else, or for a length other than `want` (0: any). node-addon-api's
// IsTypedArray, TypedArrayType, ByteLength and Data are a look-up each: ten per seal, about a
// third of a small frame's seal in `perf` (bench/RESULTS.md, "2026-12-03").
bool Bytes(napi_env env, napi_value v, uint8_t** data, size_t* length, size_t want = 0) {
  napi_typedarray_type type;
  void* d = nullptr;
  if (napi_get_typedarray_info(env, v, &type, length, &d, nullptr, nullptr) != napi_ok) return false;
  if (type != napi_uint8_array || (want != 0 && *length != want)) return false;
  *data = static_cast<uint8_t*>(d);
  return true;
}

Napi::Value Fail(Napi::Env env, const char* what) {
  Napi::RangeError::New(env, what).ThrowAsJavaScriptException();
  return env.Undefined();
}

// An AES key argument: a string of 32 one-byte characters (its latin1 bytes are the key), read
// into `key`, which has room for kKey + 2 bytes; false for anything else. Each character
// counts by its low byte, so any such string is some key (a wrong one at worst).
bool KeyArg(napi_env env, napi_value v, uint8_t* key) {
  size_t copied = 0;
  return napi_get_value_string_latin1(env, v, reinterpret_cast<char*>(key), kKey + 2, &copied) == napi_ok &&
         copied == kKey;
}

// ---- AES-256-GCM ----------------------------------------------------------------------------

// A key is a string of 32 one-byte characters that JS holds (protocol/crypto/native.ts), the
// smallest thing V8 keeps 32 bytes in: a connection's two keys cost less than two N-API objects
// wrapping them did (docs/ARCHITECTURE.md, "Memory"). The addon keeps no object per key, so a
// call finds its state without N-API's unwrap of `this` (a property look-up by private symbol:
// ~2.4% of the gateway's CPU samples device to device, bench/RESULTS.md, "2026-12-04,
// seventeenth session"). Each thread keeps, per direction, a table of kSlots OpenSSL contexts,
// each loaded with one key; a key's slot is fixed by its first bytes (keys come from HKDF:
// uniform; which slot a key uses, visible at most to a cache-timing observer on the same
// machine, tells 8 of its 256 bits). A frame under the key its slot holds only sets the IV; any
// other loads its key into the slot first (the AES key schedule and the GHASH table). A context
// costs ~1.9 KiB of native memory, so a table holds at most ~0.5 MiB per direction and thread,
// made as slots are first used, whatever the number of connections.
constexpr size_t kSlots = 256;

struct Slot {
  EVP_CIPHER_CTX* ctx;
  bool loaded;
  uint8_t key[kKey];
};

// Per thread and direction, made on first use (only the threads that seal or open have one: the
// main thread of a gateway or a client, or a worker thread that runs a client), and freed when
// the thread's Node environment ends (FreeTables, an environment cleanup hook): a worker that
// exits leaves no contexts behind.
thread_local Slot* tSlots[2] = {nullptr, nullptr};

// Frees the calling thread's tables; each context's key schedule is wiped with it.
void FreeTables(void*) {
  for (Slot*& table : tSlots) {
    if (!table) continue;
    for (size_t i = 0; i < kSlots; i++) {
      if (table[i].ctx) EVP_CIPHER_CTX_free(table[i].ctx);
      OPENSSL_cleanse(table[i].key, kKey);
    }
    delete[] table;
    table = nullptr;
  }
}

// Wipes a call's copy of its key when the call returns.
struct Wiped {
  uint8_t* key;
  explicit Wiped(uint8_t* k) : key(k) {}
  ~Wiped() { OPENSSL_cleanse(key, kKey + 2); }
};

// The slot of `key` in a table: by its first 8 bytes.
Slot& SlotOf(Slot* table, const uint8_t* key) {
  uint64_t h;
  std::memcpy(&h, key, sizeof h);
  return table[h % kSlots];
}

// The context of `key` for a direction (1: encrypt, 0: decrypt), loaded with it; null when
// OpenSSL cannot make one.
EVP_CIPHER_CTX* ContextFor(const uint8_t* key, int encrypt) {
  Slot*& table = tSlots[encrypt];
  if (!table) {
    table = new (std::nothrow) Slot[kSlots]();
    if (!table) return nullptr;
  }
  Slot& slot = SlotOf(table, key);
  if (slot.loaded && CRYPTO_memcmp(slot.key, key, kKey) == 0) return slot.ctx;
  slot.loaded = false;
  if (!slot.ctx) {
    slot.ctx = EVP_CIPHER_CTX_new();
    if (!slot.ctx || EVP_CipherInit_ex(slot.ctx, EVP_aes_256_gcm(), nullptr, nullptr, nullptr, encrypt) != 1) {
      EVP_CIPHER_CTX_free(slot.ctx);
      slot.ctx = nullptr;
      return nullptr;
    }
  }
  if (EVP_CipherInit_ex(slot.ctx, nullptr, nullptr, key, nullptr, encrypt) != 1) return nullptr;
  std::memcpy(slot.key, key, kKey);
  slot.loaded = true;
  return slot.ctx;
}

// A forgotten key leaves no copy in this thread's tables: its slot is loaded with zeros.
void Forget(const uint8_t* key, int encrypt) {
  Slot* table = tSlots[encrypt];
  if (!table) return;
  Slot& slot = SlotOf(table, key);
  if (!slot.loaded || CRYPTO_memcmp(slot.key, key, kKey) != 0) return;
  static const uint8_t zero[kKey] = {0};
  EVP_CipherInit_ex(slot.ctx, nullptr, nullptr, zero, nullptr, encrypt);
  OPENSSL_cleanse(slot.key, kKey);
  slot.loaded = false;
}

// aesGcmSeal(key, out, offset, iv, plaintext) -> undefined. Writes iv ‖ ciphertext ‖ tag at
// `offset` of a caller-allocated buffer (JS allocates from Node's buffer pool, cheaper than a
// fresh native allocation per frame).
Napi::Value AesGcmSeal(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint8_t key[kKey + 2];
  uint8_t* out = nullptr;
  uint8_t* iv = nullptr;
  uint8_t* plain = nullptr;
  size_t cap = 0;
  size_t ivLength = 0;
  size_t n = 0;
  Wiped wiped(key);
  if (info.Length() < 5 || !KeyArg(env, info[0], key) || !Bytes(env, info[1], &out, &cap) || !info[2].IsNumber() ||
      !Bytes(env, info[3], &iv, &ivLength, kIv) || !Bytes(env, info[4], &plain, &n)) {
    return Fail(env, "aesGcmSeal(key: 32 one-byte characters, out, offset, iv: 12 bytes, plaintext)");
  }
  if (n > kMaxData) return Fail(env, "plaintext too long");
  int64_t offset = info[2].As<Napi::Number>().Int64Value();
  if (offset < 0 || size_t(offset) > cap || cap - size_t(offset) < kIv + n + kTag) {
    return Fail(env, "output buffer too small");
  }
  EVP_CIPHER_CTX* ctx = ContextFor(key, 1);
  if (!ctx) return Fail(env, "cannot create an AES-GCM context");
  uint8_t* p = out + offset;
  std::memcpy(p, iv, kIv);
  uint8_t* ct = p + kIv;
  int len = 0;
  int fin = 0;
  if (EVP_EncryptInit_ex(ctx, nullptr, nullptr, nullptr, p) != 1 ||
      (n > 0 && EVP_EncryptUpdate(ctx, ct, &len, plain, int(n)) != 1) ||
      EVP_EncryptFinal_ex(ctx, ct + len, &fin) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, int(kTag), ct + n) != 1) {
    return Fail(env, "AES-GCM encryption failed");
  }
  return env.Undefined();
}

// aesGcmOpen(key, body, out) -> boolean. `out` holds exactly body.length - 28 bytes.
Napi::Value AesGcmOpen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint8_t key[kKey + 2];
  uint8_t* body = nullptr;
  uint8_t* out = nullptr;
  size_t total = 0;
  size_t outLength = 0;
  Wiped wiped(key);
  if (info.Length() < 3 || !KeyArg(env, info[0], key) || !Bytes(env, info[1], &body, &total) ||
      !Bytes(env, info[2], &out, &outLength)) {
    return Fail(env, "aesGcmOpen(key: 32 one-byte characters, body, out)");
  }
  if (total < kIv + kTag) return Napi::Boolean::New(env, false);
  size_t n = total - kIv - kTag;
  if (outLength != n) return Fail(env, "output buffer must be body.length - 28 bytes");
  if (n > kMaxData) return Napi::Boolean::New(env, false);
  EVP_CIPHER_CTX* ctx = ContextFor(key, 0);
  if (!ctx) return Fail(env, "cannot create an AES-GCM context");
  uint8_t tag[kTag];
  std::memcpy(tag, body + kIv + n, kTag);
  int len = 0;
  int fin = 0;
  bool ok = EVP_DecryptInit_ex(ctx, nullptr, nullptr, nullptr, body) == 1 &&
            (n == 0 || EVP_DecryptUpdate(ctx, out, &len, body + kIv, int(n)) == 1) &&
            EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, int(kTag), tag) == 1 &&
            EVP_DecryptFinal_ex(ctx, out + len, &fin) == 1;
  return Napi::Boolean::New(env, ok);
}

// aesGcmForget(key) -> undefined: this thread's contexts keep no copy of the key.
Napi::Value AesGcmForget(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint8_t key[kKey + 2];
  Wiped wiped(key);
  if (info.Length() < 1 || !KeyArg(env, info[0], key)) return Fail(env, "aesGcmForget(key: 32 one-byte characters)");
  Forget(key, 1);
  Forget(key, 0);
  return env.Undefined();
}

// ---- X25519 ---------------------------------------------------------------------------------

// x25519KeyPair(privateKey?) -> [privateKey, publicKey]
Napi::Value X25519KeyPair(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint8_t priv[kKey];
  if (info.Length() > 0 && !info[0].IsUndefined()) {
    uint8_t* given = nullptr;
    size_t length = 0;
    if (!Bytes(env, info[0], &given, &length, kKey)) return Fail(env, "X25519 private key must be 32 bytes");
    std::memcpy(priv, given, kKey);
  } else if (RAND_bytes(priv, int(kKey)) != 1) {
    return Fail(env, "no randomness");
  }
  EVP_PKEY* key = EVP_PKEY_new_raw_private_key(EVP_PKEY_X25519, nullptr, priv, kKey);
  if (!key) return Fail(env, "bad X25519 private key");
  auto pub = Napi::Buffer<uint8_t>::New(env, kKey);
  size_t len = kKey;
  int ok = EVP_PKEY_get_raw_public_key(key, pub.Data(), &len);
  EVP_PKEY_free(key);
  if (ok != 1 || len != kKey) return Fail(env, "cannot derive the X25519 public key");
  auto privOut = Napi::Buffer<uint8_t>::Copy(env, priv, kKey);
  OPENSSL_cleanse(priv, kKey);
  auto pair = Napi::Array::New(env, 2);
  pair.Set(uint32_t(0), privOut);
  pair.Set(uint32_t(1), pub);
  return pair;
}

// x25519(privateKey, peerPublicKey) -> shared secret; throws on a bad key or an all-zero result
Napi::Value X25519(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint8_t* privKey = nullptr;
  uint8_t* peerKey = nullptr;
  size_t length = 0;
  if (info.Length() < 2 || !Bytes(env, info[0], &privKey, &length, kKey) ||
      !Bytes(env, info[1], &peerKey, &length, kKey)) {
    return Fail(env, "x25519(privateKey: 32 bytes, peerPublicKey: 32 bytes)");
  }
  EVP_PKEY* priv = EVP_PKEY_new_raw_private_key(EVP_PKEY_X25519, nullptr, privKey, kKey);
  EVP_PKEY* peer = EVP_PKEY_new_raw_public_key(EVP_PKEY_X25519, nullptr, peerKey, kKey);
  EVP_PKEY_CTX* ctx = priv ? EVP_PKEY_CTX_new(priv, nullptr) : nullptr;
  uint8_t shared[kKey];
  size_t len = kKey;
  bool ok = priv && peer && ctx && EVP_PKEY_derive_init(ctx) == 1 && EVP_PKEY_derive_set_peer(ctx, peer) == 1 &&
            EVP_PKEY_derive(ctx, shared, &len) == 1 && len == kKey;
  if (ctx) EVP_PKEY_CTX_free(ctx);
  if (peer) EVP_PKEY_free(peer);
  if (priv) EVP_PKEY_free(priv);
  if (!ok) return Fail(env, "X25519 key agreement failed");
  uint8_t acc = 0;
  for (size_t i = 0; i < kKey; i++) acc |= shared[i];
  if (acc == 0) return Fail(env, "X25519 shared secret is all zero");
  auto out = Napi::Buffer<uint8_t>::Copy(env, shared, kKey);
  OPENSSL_cleanse(shared, kKey);
  return out;
}

// ---- Ed25519 --------------------------------------------------------------------------------

class Ed25519Key : public Napi::ObjectWrap<Ed25519Key> {
 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "Ed25519Key",
                       {InstanceMethod<&Ed25519Key::PublicKey>("publicKey"), InstanceMethod<&Ed25519Key::Sign>("sign")});
  }

  explicit Ed25519Key(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Ed25519Key>(info) {
    uint8_t* seed = nullptr;
    size_t length = 0;
    if (info.Length() < 1 || !Bytes(info.Env(), info[0], &seed, &length, kKey)) {
      Napi::RangeError::New(info.Env(), "Ed25519 seed must be 32 bytes").ThrowAsJavaScriptException();
      return;
    }
    key_ = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, nullptr, seed, kKey);
    if (!key_) Napi::RangeError::New(info.Env(), "bad Ed25519 seed").ThrowAsJavaScriptException();
  }

  ~Ed25519Key() override {
    if (key_) EVP_PKEY_free(key_);
  }

 private:
  Napi::Value PublicKey(const Napi::CallbackInfo& info) {
    auto pub = Napi::Buffer<uint8_t>::New(info.Env(), kKey);
    size_t len = kKey;
    if (!key_ || EVP_PKEY_get_raw_public_key(key_, pub.Data(), &len) != 1) return Fail(info.Env(), "no key");
    return pub;
  }

  Napi::Value Sign(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!key_) return Fail(env, "no key");
    uint8_t* message = nullptr;
    size_t n = 0;
    if (info.Length() < 1 || !Bytes(env, info[0], &message, &n)) return Fail(env, "sign(message: Uint8Array)");
    EVP_MD_CTX* md = EVP_MD_CTX_new();
    auto sig = Napi::Buffer<uint8_t>::New(env, 64);
    size_t len = 64;
    bool ok = md && EVP_DigestSignInit(md, nullptr, nullptr, nullptr, key_) == 1 &&
              EVP_DigestSign(md, sig.Data(), &len, message, n) == 1 && len == 64;
    if (md) EVP_MD_CTX_free(md);
    if (!ok) return Fail(env, "Ed25519 signing failed");
    return sig;
  }

  EVP_PKEY* key_ = nullptr;
};

// ed25519Verify(publicKey, message, signature) -> boolean (false for any bad input)
Napi::Value Ed25519Verify(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint8_t* pubKey = nullptr;
  uint8_t* message = nullptr;
  uint8_t* signature = nullptr;
  size_t length = 0;
  size_t n = 0;
  if (info.Length() < 3 || !Bytes(env, info[0], &pubKey, &length, kKey) || !Bytes(env, info[1], &message, &n) ||
      !Bytes(env, info[2], &signature, &length, 64)) {
    return Napi::Boolean::New(env, false);
  }
  EVP_PKEY* pub = EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, nullptr, pubKey, kKey);
  if (!pub) return Napi::Boolean::New(env, false);
  EVP_MD_CTX* md = EVP_MD_CTX_new();
  bool ok = md && EVP_DigestVerifyInit(md, nullptr, nullptr, nullptr, pub) == 1 &&
            EVP_DigestVerify(md, signature, 64, message, n) == 1;
  if (md) EVP_MD_CTX_free(md);
  EVP_PKEY_free(pub);
  return Napi::Boolean::New(env, ok);
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  // Init runs on the environment's own thread (the main thread, each worker), once per load of
  // the addon: the hook is added once per thread (Node refuses the same hook twice).
  static thread_local bool hooked = false;
  if (!hooked && napi_add_env_cleanup_hook(env, FreeTables, nullptr) == napi_ok) hooked = true;
  exports.Set("aesGcmSeal", Napi::Function::New(env, AesGcmSeal));
  exports.Set("aesGcmOpen", Napi::Function::New(env, AesGcmOpen));
  exports.Set("aesGcmForget", Napi::Function::New(env, AesGcmForget));
  exports.Set("Ed25519Key", Ed25519Key::Init(env));
  exports.Set("x25519KeyPair", Napi::Function::New(env, X25519KeyPair));
  exports.Set("x25519", Napi::Function::New(env, X25519));
  exports.Set("ed25519Verify", Napi::Function::New(env, Ed25519Verify));
  exports.Set("openssl", Napi::String::New(env, OPENSSL_VERSION_TEXT));
  return exports;
}

}  // namespace

NODE_API_MODULE(gw_crypto, Init)
