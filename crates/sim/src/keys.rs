//! The astdb `CustomDevstate` keys of every simulated server of the process, numbered once.
//!
//! A federation's servers hold the same devices (in the benchmark every server holds the other
//! nine servers' devices), and one change reaches each of them within milliseconds. With a map
//! per server, each of those `Setvar`s looked its key up in a map of its own (ten maps of
//! ~10,000 entries: a cache miss or two per `Setvar`). Here a key is numbered once for the
//! process ([`KeyId`], dense from 0); each server keeps its entries in an array indexed by that
//! number ([`Table`]), and the name → number lookup goes to a copy of the numbering kept by the
//! runtime thread that asks (no lock, and the entry just looked up by the previous server on
//! this thread is still in the CPU's cache). A copy misses only for a key it has not seen yet;
//! it then asks the process-wide numbering, under its lock.
//!
//! Keys are never forgotten (the simulator's keys come from its clients; a key costs its name
//! once per process and once per runtime thread, plus 8 bytes in each server's array).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, MutexGuard, PoisonError};

use compact_str::CompactString;

/// A hash map with short keys inline, hashed with foldhash (seeded per process).
type FastMap<V> = HashMap<CompactString, V, foldhash::fast::RandomState>;

/// A key's number: dense from 0 in first-numbered order, the same for every server and thread
/// of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct KeyId(u32);

impl KeyId {
    fn index(self) -> usize {
        self.0 as usize
    }
}

/// The process-wide numbering.
#[derive(Default)]
struct Numbering {
    ids: FastMap<KeyId>,
    /// Names by number.
    names: Vec<CompactString>,
}

static NUMBERING: LazyLock<Mutex<Numbering>> = LazyLock::new(Mutex::default);

thread_local! {
    /// This thread's copy of the numbering's map (what it asked for so far).
    static LOCAL: RefCell<FastMap<KeyId>> = RefCell::new(FastMap::default());
}

fn numbering() -> MutexGuard<'static, Numbering> {
    NUMBERING.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The number of `key` if it has one (a read never numbers a key).
pub(crate) fn get(key: &str) -> Option<KeyId> {
    if let Some(id) = LOCAL.with_borrow(|m| m.get(key).copied()) {
        return Some(id);
    }
    let id = numbering().ids.get(key).copied()?;
    LOCAL.with_borrow_mut(|m| m.insert(CompactString::new(key), id));
    Some(id)
}

/// The number of `key`, numbering it if it has none yet.
pub(crate) fn intern(key: &str) -> KeyId {
    if let Some(id) = LOCAL.with_borrow(|m| m.get(key).copied()) {
        return id;
    }
    let id = {
        let mut n = numbering();
        match n.ids.get(key) {
            Some(&id) => id,
            None => {
                // More than 4 billion keys would not fit in memory anyway.
                let id = KeyId(u32::try_from(n.names.len()).unwrap_or(u32::MAX));
                let name = CompactString::new(key);
                n.ids.insert(name.clone(), id);
                n.names.push(name);
                id
            }
        }
    };
    LOCAL.with_borrow_mut(|m| m.insert(CompactString::new(key), id));
    id
}

/// The names of `ids`, in their order (one lock for all).
pub(crate) fn names(ids: impl IntoIterator<Item = KeyId>) -> Vec<CompactString> {
    let n = numbering();
    ids.into_iter()
        .map(|id| n.names.get(id.index()).cloned().unwrap_or_default())
        .collect()
}

/// One server's entries by key number (`None`: the key has no entry in this server).
#[derive(Debug, Clone)]
pub(crate) struct Table<V> {
    entries: Vec<Option<V>>,
}

impl<V> Default for Table<V> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
        }
    }
}

impl<V> Table<V> {
    /// The entry of `key`.
    pub(crate) fn get(&self, key: &str) -> Option<&V> {
        get(key).and_then(|id| self.entries.get(id.index())?.as_ref())
    }

    /// The entry of `id`.
    pub(crate) fn get_mut(&mut self, id: KeyId) -> Option<&mut V> {
        self.entries.get_mut(id.index())?.as_mut()
    }

    /// Sets the entry of `id`.
    pub(crate) fn insert(&mut self, id: KeyId, v: V) {
        let i = id.index();
        if i >= self.entries.len() {
            self.entries.resize_with(i + 1, || None);
        }
        if let Some(e) = self.entries.get_mut(i) {
            *e = Some(v);
        }
    }

    /// Every entry with its key number, in number order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (KeyId, &V)> {
        self.entries.iter().enumerate().filter_map(|(i, e)| {
            let id = KeyId(u32::try_from(i).ok()?);
            Some((id, e.as_ref()?))
        })
    }

    /// Every entry, to change.
    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.entries.iter_mut().flatten()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn a_key_has_one_number_in_every_thread_and_reads_never_number() {
        let unseen = "keys-test-never-numbered";
        assert_eq!(get(unseen), None);
        let a = intern("keys-test-a");
        assert_eq!(intern("keys-test-a"), a);
        assert_ne!(intern("keys-test-A"), a, "keys are case-sensitive");
        // Another thread (an empty copy) finds the same numbers, and numbers a key that this
        // thread then finds.
        let (a2, b) = std::thread::spawn(|| (get("keys-test-a"), intern("keys-test-b")))
            .join()
            .expect("thread");
        assert_eq!(a2, Some(a));
        assert_eq!(get("keys-test-b"), Some(b));
        assert_eq!(get(unseen), None);
        assert_eq!(names([b, a]), ["keys-test-b", "keys-test-a"]);
    }

    #[test]
    fn a_table_holds_what_a_map_by_name_holds() {
        // The model: a map by name; keys written from two threads in turn.
        let keys: Vec<String> = (0..50).map(|i| format!("keys-table-{i}")).collect();
        let mut table: Table<u64> = Table::default();
        let mut model: BTreeMap<String, u64> = BTreeMap::new();
        let mut seed = 11u64;
        for step in 0..2_000u64 {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let key = &keys[(seed >> 33) as usize % keys.len()];
            let id = if step % 2 == 0 {
                intern(key)
            } else {
                let k = key.clone();
                std::thread::spawn(move || intern(&k))
                    .join()
                    .expect("thread")
            };
            match table.get_mut(id) {
                Some(v) => *v += step,
                None => table.insert(id, step),
            }
            *model.entry(key.clone()).or_insert(0) += step;
            assert_eq!(table.get(key), model.get(key));
        }
        let (ids, values): (Vec<KeyId>, Vec<u64>) = table.iter().map(|(id, v)| (id, *v)).unzip();
        let mut listed: Vec<(String, u64)> = names(ids)
            .into_iter()
            .map(String::from)
            .zip(values)
            .collect();
        listed.sort();
        assert_eq!(listed, model.into_iter().collect::<Vec<_>>());
        for v in table.values_mut() {
            *v = 0;
        }
        assert!(table.iter().all(|(_, v)| *v == 0));
        assert_eq!(table.get("keys-table-never"), None);
    }
}
