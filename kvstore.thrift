// kvstore wire protocol: framed transport, binary protocol.
//
// The first four methods are the seed's service, unchanged in names, field ids
// and types, so a client generated from the seed IDL works against a kvstore
// node. Everything after them is a kvstore extension.
//
// Refusals (a get/put sent to a non-primary, a replicate from a stale primary,
// an oversized key) are sent as TApplicationException, never as a normal reply:
// a client that only knows the seed IDL then sees an error, not a success.
// The exception's `type` carries a kvstore error code (see errors.py):
//   100 NOT_PRIMARY   101 UNAVAILABLE   102 TOO_LARGE   103 BAD_REQUEST
//   104 STALE_EPOCH   105 REPLICATION_FAILED (outcome unknown)   106 DATA_LOST
//   107 FORBIDDEN (a node-only method from a client certificate, or, with a cluster
//       secret, from a connection that has not authenticated)
//   108 DISK_FULL (the primary's disk is full: the write was not applied; reads go on)

namespace py kvstore
namespace java kvstore

struct NodeStatus {
  1: string node_id,        // this node's znode name
  2: string role,           // starting | standby | syncing | backup | primary | stopped
  3: i64 epoch,             // the primary epoch this node serves under (0: none)
  4: i64 key_count,
  5: string primary_address, // host:port of the primary as this node knows it ("" if unknown)
  6: optional string durable_id, // its data directory's node id (absent: no data directory)
  7: optional string incarnation // the cluster incarnation it serves (absent: none, a standby)
}

// Exactly-once: a write that carries a RequestId is applied at most once per
// (client_id, seq); a retry gets the outcome recorded the first time. acked_below is
// the client's lowest seq still awaiting an answer: records below it may be forgotten.
struct RequestId {
  1: string client_id,
  2: i64 seq,
  3: i64 acked_below
}

// One replicated change, applied in order under the key's stripe lock. value unset is a
// delete (a tombstone); client_id set means "also remember this outcome" (exactly-once).
// In a SyncChunk, a record with key "" carries only the exactly-once record.
struct Change {
  1: string key,
  2: optional string value,
  3: optional string client_id,
  4: i64 seq,
  5: bool outcome,
  6: i64 acked_below
}

struct Lookup {
  1: bool found,
  2: optional string value
}

// A piece of an export (scan): the keys and values of whole lock stripes.
struct ScanChunk {
  1: list<string> keys,
  2: list<string> values,
  3: i32 next_stripe,       // where the next scan starts; -1 after the last stripe
  4: i64 epoch              // the primary's: stripes are its own, so a scan spans one primary
}

struct SyncChunk {
  1: list<string> keys,
  2: list<string> values,
  3: i32 next_stripe,       // -1 when the snapshot is complete
  4: list<Change> records   // the exactly-once records of the same stripes
}

// Incremental catch-up: records of the primary's write-ahead log, in its order, as they are in
// its files (checksummed records, see server/records.py); the backup checks them.
struct LogChunk {
  1: binary records,
  2: i64 next_position      // where the next sync_log starts; -1 when the catch-up is complete
}

service KeyValueService {
  string get(1: string key);
  void put(1: string key, 2: string value);
  // Kept for wire compatibility and always refused (STALE_EPOCH): a kvstore primary
  // replicates with replicate_batch, which names its epoch and the backup's join.
  void replicate(1: string key, 2: string value);
  // The primary's whole store at one instant (a consistent cut across stripes).
  map<string, string> dump();

  // --- kvstore extensions ---
  // Primary -> backup: apply entries in order. An empty batch is a heartbeat. Accepted
  // only from the current primary (epoch) for the backup's current join (join_id);
  // every accepted batch renews the primary's read lease.
  // changes (deletes) are applied after keys/values (a batch never holds a key twice: the
  // primary holds the key's stripe lock until the backup answered).
  // log_position, log_id: the batch's end in the primary's write-ahead log (a batch is a
  // contiguous range of it) and that log's id; set only by a primary with a data directory.
  // A backup whose copy is complete records them (its catch-up point after a restart).
  // Exactly-once records of the keys/values entries, when any entry has one, travel flat
  // beside them (a struct per entry costs several times as much to encode and decode):
  // entry i was written by record_clients[i] ("" for none) with seq record_seqs[i] and
  // acked_below record_acked[i]. The three lists are as long as keys, or all unset. Sent
  // only to a backup whose join said protocol >= 2 (an older one would skip them unread);
  // to others such writes go as Changes.
  void replicate_batch(1: i64 epoch, 2: list<string> keys, 3: list<string> values, 4: string join_id,
                       5: list<Change> changes, 6: optional i64 log_position,
                       7: optional string log_id, 8: list<string> record_clients,
                       9: list<i64> record_seqs, 10: list<i64> record_acked);
  NodeStatus status();
  // Backup -> primary: start forwarding puts to backup_id (tagged with join_id), then
  // fetch the snapshot stripe by stripe with sync_fetch and confirm with join_done.
  // lease_ms is the read lease this backup grants; the primary returns its stripe count.
  // durable_id: the backup's stable id if it keeps a data directory (recorded in the metadata).
  // log_epoch, log_id, log_position: how far the backup's copy on disk goes in a primary's log
  // (its last recorded batch). If this primary wrote that log in this epoch and still holds
  // it from there, the backup keeps its store and replays the rest with sync_log instead of
  // copying every stripe (sync_log is refused otherwise: the backup then joins anew, empty).
  // protocol: what the backup understands beyond the original join (unset: nothing);
  // 2: exactly-once records sent flat in replicate_batch (fields 8-10).
  i32 join(1: i64 epoch, 2: string backup_id, 3: string join_id, 4: i32 lease_ms,
           5: optional string durable_id, 6: optional i64 log_epoch, 7: optional string log_id,
           8: optional i64 log_position, 9: optional i32 protocol);
  SyncChunk sync_fetch(1: i64 epoch, 2: string join_id, 3: i32 first_stripe, 4: i32 max_entries);
  // Incremental catch-up: the primary's log records from position on (as accepted by join),
  // at most about max_bytes of them per call.
  LogChunk sync_log(1: i64 epoch, 2: string join_id, 3: i64 position, 4: i32 max_bytes);
  void join_done(1: i64 epoch, 2: string join_id);
  // Backup -> primary: the in-sync backup of join join_id registered again as backup_id (its
  // ZooKeeper session expired; it kept its data and this join's fence). The primary renames
  // it in the in-sync set, or refuses (the backup then joins anew once it is not listed).
  void backup_renamed(1: i64 epoch, 2: string join_id, 3: string backup_id);

  // --- node authentication without TLS (kv-node --cluster-secret-file) ---
  // Once per connection, before a node-only call: auth_challenge returns a fresh 32-byte
  // nonce; authenticate(client_nonce, proof) with proof = HMAC-SHA256(secret,
  // "kvstore cluster secret v1\0caller\0" + nonce + client_nonce) makes the connection a
  // node's and returns the node's own proof (the same with "node" for "caller"). A wrong
  // proof, a reused nonce or a node without a secret: FORBIDDEN. See rpc/secret.py.
  binary auth_challenge();
  binary authenticate(1: binary client_nonce, 2: binary proof);

  // --- the store API (kvstore.Client) ---
  // get that tells a missing key from an empty value.
  Lookup lookup(1: string key);
  // Each key's value is linearizable on its own; the map is not a snapshot across keys.
  // Missing keys are left out.
  map<string, string> get_many(1: list<string> keys);
  // Writes with an optional RequestId (exactly-once). remove returns whether the key
  // existed; compare_and_set swaps in value iff the current value equals expected
  // (expected unset: iff the key is absent) and returns whether it did.
  void put_once(1: string key, 2: string value, 3: RequestId id);
  bool remove(1: string key, 2: RequestId id);
  bool compare_and_set(1: string key, 2: optional string expected, 3: string value, 4: RequestId id);
  // Export, a chunk at a time: the keys and values of whole stripes from first_stripe on
  // (0 to begin), until about max_entries (at least one stripe). Each stripe is copied at
  // one instant: a key neither written nor deleted during the scan is in it exactly once;
  // one written meanwhile may or may not be. Continue at next_stripe with the epoch of the
  // first chunk (0 to begin): stripes are a primary's own, so a primary of another epoch
  // (after a failover) answers an empty chunk with its epoch, and the scan starts again.
  ScanChunk scan(1: i32 first_stripe, 2: i32 max_entries, 3: i64 epoch);
}
