//! Where the key API finds keys, their material and their grants: the [`KeyDirectory`]
//! the service depends on, and [`Directory`], which holds domain objects by name and id
//! (fed by watches in the wiring, or filled by hand in tests through [`Feed`]), derives
//! each key's state from its spec and material whenever either changes, and unwraps each
//! key's material once, and again only when it changes.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use crate::crypto::RootKey;
use crate::domain::{ALIAS_PREFIX, Alias, Grant, Key, KeySnapshot, WrappedMaterial};
use crate::keyring::{self, MaterialError};

/// Keys and grants, by name or id.
pub trait KeyDirectory: Send + Sync + 'static {
    /// A key by `namespace/name`, `namespace/alias/<alias>` or keyId, if there is one.
    fn resolve(&self, name: &str) -> Option<Arc<Key>>;
    /// Every version the key holds, unwrapped (none when it holds none).
    fn material(&self, key: &Key) -> Result<Arc<KeySnapshot>, MaterialError>;
    /// The grants of one key.
    fn grants(&self, namespace: &str, key_name: &str) -> Vec<Arc<Grant>>;
    /// A grant by `namespace/name` or grantId.
    fn grant(&self, name: &str) -> Option<Arc<Grant>>;
    /// Every key of one namespace (the AWS API's ListKeys); none unless the directory
    /// can list.
    fn keys_in(&self, _namespace: &str) -> Vec<Arc<Key>> {
        Vec::new()
    }
    /// Every alias of one namespace (the AWS API's ListAliases); none unless the directory
    /// can list.
    fn aliases_in(&self, _namespace: &str) -> Vec<Arc<Alias>> {
        Vec::new()
    }
    /// Every grant `keep` keeps, of every namespace (the AWS API's ListRetirableGrants);
    /// none unless the directory can list.
    fn grants_where(&self, _keep: &dyn Fn(&Grant) -> bool) -> Vec<Arc<Grant>> {
        Vec::new()
    }
}

/// An object a [`Mirror`] holds: named by namespace (empty when cluster-scoped) and name,
/// and identified by a unique id.
pub trait Mirrored {
    fn namespace(&self) -> &str;
    fn name(&self) -> &str;
    fn id(&self) -> &str;
    /// The object of its namespace this one belongs to, when the mirror finds objects by
    /// that too (a grant's key).
    fn owner(&self) -> Option<&str> {
        None
    }
}

impl Mirrored for Key {
    fn namespace(&self) -> &str {
        &self.info.namespace
    }
    fn name(&self) -> &str {
        &self.info.name
    }
    fn id(&self) -> &str {
        &self.info.key_id
    }
}

impl Mirrored for Alias {
    fn namespace(&self) -> &str {
        &self.namespace
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn id(&self) -> &str {
        &self.uid
    }
}

impl Mirrored for Grant {
    fn namespace(&self) -> &str {
        &self.namespace
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn id(&self) -> &str {
        &self.grant_id
    }
    fn owner(&self) -> Option<&str> {
        Some(&self.key_name)
    }
}

/// Material objects are cluster-scoped and named by their key's UID.
impl Mirrored for WrappedMaterial {
    fn namespace(&self) -> &str {
        ""
    }
    fn name(&self) -> &str {
        &self.uid
    }
    fn id(&self) -> &str {
        &self.key_id
    }
}

type Name = (String, String);

struct Objects<D> {
    by_name: HashMap<Name, Arc<D>>,
    by_id: HashMap<String, Name>,
    /// The names of the objects that belong to each (namespace, owner), so that a key's
    /// grants are found without reading every grant of the cluster.
    by_owner: HashMap<Name, BTreeSet<String>>,
}

impl<D> Default for Objects<D> {
    fn default() -> Self {
        Objects { by_name: HashMap::new(), by_id: HashMap::new(), by_owner: HashMap::new() }
    }
}

/// The (namespace, owner) an object is found under, if any.
fn owner_of<D: Mirrored>(object: &D) -> Option<Name> {
    object.owner().map(|owner| (object.namespace().to_owned(), owner.to_owned()))
}

impl<D: Mirrored> Objects<D> {
    fn insert(&mut self, object: D) {
        let name = (object.namespace().to_owned(), object.name().to_owned());
        if let Some(old) = self.by_name.get(&name).cloned() {
            self.forget(&old);
        }
        self.by_id.insert(object.id().to_owned(), name.clone());
        if let Some(owner) = owner_of(&object) {
            self.by_owner.entry(owner).or_default().insert(name.1.clone());
        }
        self.by_name.insert(name, Arc::new(object));
    }

    fn remove(&mut self, namespace: &str, name: &str) {
        if let Some(old) = self.by_name.remove(&(namespace.to_owned(), name.to_owned())) {
            self.forget(&old);
        }
    }

    /// Drops an object's id and owner entries (not its entry by name).
    fn forget(&mut self, old: &D) {
        self.by_id.remove(old.id());
        if let Some(owner) = owner_of(old)
            && let Some(names) = self.by_owner.get_mut(&owner)
        {
            names.remove(old.name());
            if names.is_empty() {
                self.by_owner.remove(&owner);
            }
        }
    }
}

/// The objects of one kind, by name and by id, as a watch last reported them.
pub struct Mirror<D> {
    objects: RwLock<Objects<D>>,
}

impl<D> Default for Mirror<D> {
    fn default() -> Self {
        Mirror { objects: RwLock::new(Objects::default()) }
    }
}

impl<D: Mirrored> Mirror<D> {
    /// Adds or replaces an object.
    pub fn apply(&self, object: D) {
        if let Ok(mut objects) = self.objects.write() {
            objects.insert(object);
        }
    }

    /// Removes an object.
    pub fn delete(&self, namespace: &str, name: &str) {
        if let Ok(mut objects) = self.objects.write() {
            objects.remove(namespace, name);
        }
    }

    /// Replaces every object (a watch's fresh list).
    pub fn replace_all(&self, all: Vec<D>) {
        let mut fresh = Objects::default();
        for object in all {
            fresh.insert(object);
        }
        if let Ok(mut objects) = self.objects.write() {
            *objects = fresh;
        }
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<D>> {
        let objects = self.objects.read().ok()?;
        objects.by_name.get(&(namespace.to_owned(), name.to_owned())).cloned()
    }

    pub fn by_id(&self, id: &str) -> Option<Arc<D>> {
        let objects = self.objects.read().ok()?;
        objects.by_id.get(id).and_then(|name| objects.by_name.get(name)).cloned()
    }

    /// The objects of `namespace` that belong to `owner`, by name.
    pub fn owned_by(&self, namespace: &str, owner: &str) -> Vec<Arc<D>> {
        let Ok(objects) = self.objects.read() else { return Vec::new() };
        let Some(names) = objects.by_owner.get(&(namespace.to_owned(), owner.to_owned())) else {
            return Vec::new();
        };
        names
            .iter()
            .filter_map(|name| objects.by_name.get(&(namespace.to_owned(), name.clone())).cloned())
            .collect()
    }

    /// Every object `keep` keeps.
    pub fn filter(&self, keep: impl Fn(&D) -> bool) -> Vec<Arc<D>> {
        let Ok(objects) = self.objects.read() else { return Vec::new() };
        objects.by_name.values().filter(|o| keep(o)).cloned().collect()
    }
}

/// A key's unwrapped versions and the revision of the material they came from.
type Unwrapped = (Option<String>, Arc<KeySnapshot>);

/// The key API's directory: keys, material and grants as the watches report them.
pub struct Directory {
    pub keys: Mirror<Key>,
    pub materials: Mirror<WrappedMaterial>,
    pub grants: Mirror<Grant>,
    pub aliases: Mirror<Alias>,
    root: Arc<RootKey>,
    /// Unwrapped versions by keyId, with the material revision they came from.
    unwrapped: Mutex<HashMap<String, Unwrapped>>,
    /// Held while a key is derived from its material and stored, so that a key derived
    /// from material that has changed since is never stored after the change's own
    /// derivation (the watches of keys and of material report on tasks of their own).
    deriving: Mutex<()>,
}

/// How a watch's reports change a [`Directory`].
pub trait Feed<D> {
    /// An object was added or changed.
    fn apply(&self, object: D);
    /// An object was removed.
    fn delete(&self, object: &D);
    /// The watch listed every object afresh.
    fn replace_all(&self, all: Vec<D>);
}

impl Feed<Key> for Directory {
    fn apply(&self, key: Key) {
        let _deriving = self.deriving();
        self.keys.apply(self.derived(key));
    }
    fn delete(&self, key: &Key) {
        self.keys.delete(&key.info.namespace, &key.info.name);
    }
    fn replace_all(&self, all: Vec<Key>) {
        let _deriving = self.deriving();
        self.keys.replace_all(all.into_iter().map(|k| self.derived(k)).collect());
    }
}

/// A key's state and versions follow its material: a change of the material re-derives
/// the key.
impl Feed<WrappedMaterial> for Directory {
    fn apply(&self, material: WrappedMaterial) {
        let _deriving = self.deriving();
        let (uid, key_id) = (material.uid.clone(), material.key_id.clone());
        self.materials.apply(material);
        self.rederive(&uid, &key_id);
    }
    fn delete(&self, material: &WrappedMaterial) {
        let _deriving = self.deriving();
        self.materials.delete("", &material.uid);
        self.rederive(&material.uid, &material.key_id);
    }
    fn replace_all(&self, all: Vec<WrappedMaterial>) {
        let _deriving = self.deriving();
        self.materials.replace_all(all);
        for key in self.keys.filter(|_| true) {
            self.keys.apply(self.derived((*key).clone()));
        }
    }
}

impl Feed<Alias> for Directory {
    fn apply(&self, alias: Alias) {
        self.aliases.apply(alias);
    }
    fn delete(&self, alias: &Alias) {
        self.aliases.delete(&alias.namespace, &alias.name);
    }
    fn replace_all(&self, all: Vec<Alias>) {
        self.aliases.replace_all(all);
    }
}

impl Feed<Grant> for Directory {
    fn apply(&self, grant: Grant) {
        self.grants.apply(grant);
    }
    fn delete(&self, grant: &Grant) {
        self.grants.delete(&grant.namespace, &grant.name);
    }
    fn replace_all(&self, all: Vec<Grant>) {
        self.grants.replace_all(all);
    }
}

impl Directory {
    /// Holds [`Directory::deriving`] (a panic while it was held left nothing half-done that
    /// the lock protects: it only orders derivations).
    fn deriving(&self) -> std::sync::MutexGuard<'_, ()> {
        self.deriving.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Derives the key of UID `uid` anew from its current material (of keyId `key_id`):
    /// the directory knows the key by that keyId once it has seen the material, by its UID
    /// before.
    fn rederive(&self, uid: &str, key_id: &str) {
        let key = [key_id, uid].into_iter().find_map(|id| self.keys.by_id(id).filter(|k| k.info.uid == uid));
        if let Some(key) = key {
            self.keys.apply(self.derived((*key).clone()));
        }
    }

    /// `key` with its state and versions derived from its material as the directory has it.
    fn derived(&self, key: Key) -> Key {
        let material = self.materials.get("", &key.info.uid);
        key.with_material(material.as_deref())
    }

    pub fn new(root: Arc<RootKey>) -> Self {
        Directory {
            keys: Mirror::default(),
            materials: Mirror::default(),
            grants: Mirror::default(),
            aliases: Mirror::default(),
            root,
            unwrapped: Mutex::new(HashMap::new()),
            deriving: Mutex::new(()),
        }
    }

    /// The key's live material: not destroyed, and this key's.
    fn live_material(&self, key: &Key) -> Option<Arc<WrappedMaterial>> {
        self.materials.get("", &key.info.uid).filter(|m| !m.destroyed && m.key_id == key.info.key_id)
    }

    /// Forgets the unwrapped material of keys that are gone or destroyed (run periodically:
    /// plaintext material must not outlive its key in memory).
    pub fn sweep(&self) {
        let live =
            |key_id: &String| self.keys.by_id(key_id).is_some_and(|k| self.live_material(&k).is_some());
        if let Ok(mut m) = self.unwrapped.lock() {
            m.retain(|key_id, _| live(key_id));
        }
    }

    fn versions(&self, key: &Key) -> Result<Arc<KeySnapshot>, MaterialError> {
        let key_id = &key.info.key_id;
        let material = self.live_material(key);
        if material.is_none() {
            // Destroyed or gone: drop whatever was unwrapped before.
            if let Ok(mut m) = self.unwrapped.lock() {
                m.remove(key_id);
            }
        }
        let revision = material.as_ref().and_then(|m| m.revision.clone());
        let cached = self.unwrapped.lock().ok().and_then(|m| m.get(key_id).cloned());
        if let Some((rv, snap)) = &cached
            && *rv == revision
            && snap.info == key.info
        {
            return Ok(snap.clone());
        }
        let previous = cached.as_ref().map(|(_, s)| s.as_ref());
        let snap = Arc::new(keyring::snapshot(&self.root, key.info.clone(), material.as_deref(), previous)?);
        if let Ok(mut m) = self.unwrapped.lock() {
            m.insert(key_id.clone(), (revision, snap.clone()));
        }
        Ok(snap)
    }
}

impl<T: KeyDirectory> KeyDirectory for Arc<T> {
    fn resolve(&self, name: &str) -> Option<Arc<Key>> {
        self.as_ref().resolve(name)
    }
    fn material(&self, key: &Key) -> Result<Arc<KeySnapshot>, MaterialError> {
        self.as_ref().material(key)
    }
    fn grants(&self, namespace: &str, key_name: &str) -> Vec<Arc<Grant>> {
        self.as_ref().grants(namespace, key_name)
    }
    fn grant(&self, name: &str) -> Option<Arc<Grant>> {
        self.as_ref().grant(name)
    }
    fn keys_in(&self, namespace: &str) -> Vec<Arc<Key>> {
        self.as_ref().keys_in(namespace)
    }
    fn aliases_in(&self, namespace: &str) -> Vec<Arc<Alias>> {
        self.as_ref().aliases_in(namespace)
    }
    fn grants_where(&self, keep: &dyn Fn(&Grant) -> bool) -> Vec<Arc<Grant>> {
        self.as_ref().grants_where(keep)
    }
}

impl KeyDirectory for Directory {
    fn resolve(&self, name: &str) -> Option<Arc<Key>> {
        match name.split_once('/') {
            // Key names have no '/': `namespace/alias/<alias>` names an alias.
            Some((ns, n)) => match n.strip_prefix(ALIAS_PREFIX) {
                Some(alias) => self.keys.get(ns, &self.aliases.get(ns, alias)?.target_key),
                None => self.keys.get(ns, n),
            },
            None => self.keys.by_id(name),
        }
    }

    fn material(&self, key: &Key) -> Result<Arc<KeySnapshot>, MaterialError> {
        self.versions(key)
    }

    fn grants(&self, namespace: &str, key_name: &str) -> Vec<Arc<Grant>> {
        self.grants.owned_by(namespace, key_name)
    }

    fn grant(&self, name: &str) -> Option<Arc<Grant>> {
        match name.split_once('/') {
            Some((ns, n)) => self.grants.get(ns, n),
            None => self.grants.by_id(name),
        }
    }

    fn keys_in(&self, namespace: &str) -> Vec<Arc<Key>> {
        self.keys.filter(|k| k.info.namespace == namespace)
    }

    fn aliases_in(&self, namespace: &str) -> Vec<Arc<Alias>> {
        self.aliases.filter(|a| a.namespace == namespace)
    }

    fn grants_where(&self, keep: &dyn Fn(&Grant) -> bool) -> Vec<Arc<Grant>> {
        self.grants.filter(keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::KeyMaterial;
    use crate::domain::{KeyInfo, KeyIntent, KeyState, Origin, Policy};

    fn key(enabled: bool) -> Key {
        let intent = KeyIntent { origin: Origin::Kubekms, enabled, ..Default::default() };
        Key {
            // What a watch delivers: nothing known of the material yet.
            info: KeyInfo {
                namespace: "apps".into(),
                name: "k".into(),
                key_id: "uid-1".into(),
                uid: "uid-1".into(),
                state: KeyState::Creating,
                current_version: None,
                refused_versions: Default::default(),
                valid_to: None,
            },
            intent,
            description: String::new(),
            origin: Origin::Kubekms,
            versions: Vec::new(),
            history: Vec::new(),
            created: None,
            next_rotation: None,
            deletion: None,
            automatic_rotation: true,
            rotation_period_days: 365,
            policy: Policy { delegate_to_rbac: true, statements: Vec::new() },
        }
    }

    fn material(versions: &[u32], promised: bool) -> WrappedMaterial {
        WrappedMaterial {
            key_id: "uid-1".into(),
            uid: "uid-1".into(),
            root_key_fingerprint: "rk".into(),
            destroyed: false,
            deletion_time: promised.then_some(jiff::Timestamp::UNIX_EPOCH),
            versions: versions.iter().map(|v| (*v, String::new())).collect(),
            revision: None,
            ..Default::default()
        }
    }

    fn grant(namespace: &str, name: &str, key_name: &str) -> Grant {
        Grant {
            namespace: namespace.into(),
            name: name.into(),
            grant_id: format!("id-{namespace}-{name}"),
            key_name: key_name.into(),
            key_id: None,
            state: None,
            retired_by: None,
            deleting: false,
            expires_at: None,
            grantee: crate::domain::Principal::User("u".into()),
            operations: Vec::new(),
            constraints: None,
            retiring_principal: None,
            creator: None,
        }
    }

    #[test]
    fn a_keys_grants_are_found_by_the_key_and_follow_every_change() {
        let d = Directory::new(Arc::new(RootKey::from_material(KeyMaterial::from_slice(&[3; 32]).unwrap())));
        let names = |ns: &str, key: &str| -> Vec<String> {
            d.grants(ns, key).iter().map(|g| g.name.clone()).collect()
        };
        Feed::replace_all(
            &d,
            vec![grant("apps", "a", "k"), grant("apps", "b", "k"), grant("other", "a", "k")],
        );
        Feed::apply(&d, grant("apps", "c", "j"));
        assert_eq!(names("apps", "k"), ["a", "b"], "by namespace and key");
        assert_eq!(names("other", "k"), ["a"]);
        assert_eq!(names("apps", "j"), ["c"]);
        // A grant that names another key moves; one deleted is gone; a new list replaces all.
        Feed::apply(&d, grant("apps", "b", "j"));
        assert_eq!(
            (names("apps", "k"), names("apps", "j")),
            (vec!["a".to_owned()], vec!["b".into(), "c".into()])
        );
        Feed::delete(&d, &grant("apps", "a", "k"));
        assert!(names("apps", "k").is_empty());
        assert_eq!(d.grant("id-apps-b").map(|g| g.key_name.clone()).as_deref(), Some("j"));
        Feed::replace_all(&d, vec![grant("apps", "z", "k")]);
        assert_eq!((names("apps", "k"), names("apps", "j")), (vec!["z".to_owned()], vec![]));
        assert!(d.grants.objects.read().unwrap().by_owner.len() == 1, "no empty entries are kept");
    }

    #[test]
    fn an_alias_names_a_key_of_its_namespace_and_moves() {
        let d = Directory::new(Arc::new(RootKey::from_material(KeyMaterial::from_slice(&[3; 32]).unwrap())));
        Feed::apply(&d, key(true));
        let alias = |target: &str| Alias {
            namespace: "apps".into(),
            name: "app".into(),
            uid: "a-1".into(),
            target_key: target.into(),
        };
        Feed::apply(&d, alias("k"));
        assert_eq!(d.resolve("apps/alias/app").unwrap().info.key_id, "uid-1");
        assert!(d.resolve("other/alias/app").is_none(), "an alias is of one namespace");
        assert!(d.resolve("apps/alias/none").is_none());
        Feed::apply(&d, alias("gone"));
        assert!(d.resolve("apps/alias/app").is_none(), "moved to a key that does not exist");
        assert_eq!(d.aliases_in("apps").len(), 1);
        Feed::delete(&d, &alias("gone"));
        assert!(d.aliases_in("apps").is_empty());
    }

    fn state(d: &Directory) -> (KeyState, Option<u32>) {
        let k = d.resolve("apps/k").unwrap();
        (k.info.state, k.info.current_version)
    }

    #[test]
    fn a_key_is_derived_anew_whenever_it_or_its_material_changes() {
        let d = Directory::new(Arc::new(RootKey::from_material(KeyMaterial::generate().unwrap())));
        // The key arrives before its material, then the material: either order works.
        d.apply(key(true));
        assert_eq!(state(&d), (KeyState::Creating, None));
        d.apply(material(&[1], false));
        assert_eq!(state(&d), (KeyState::Enabled, Some(1)));
        d.apply(material(&[1, 2], false));
        assert_eq!(state(&d), (KeyState::Enabled, Some(2)));
        assert_eq!(d.resolve("uid-1").unwrap().versions, [1, 2], "and by keyId");
        // The spec disables the key: refused at once, whatever else is known.
        d.apply(key(false));
        assert_eq!(state(&d), (KeyState::Disabled, Some(2)));
        // A promised deletion in the material refuses the key even with its spec enabled.
        d.apply(key(true));
        d.apply(material(&[1, 2], true));
        assert_eq!(state(&d).0, KeyState::PendingDeletion);
        // A fresh list re-derives every key.
        Feed::<WrappedMaterial>::replace_all(&d, vec![material(&[1, 2, 3], false)]);
        assert_eq!(state(&d), (KeyState::Enabled, Some(3)));
        Feed::<WrappedMaterial>::delete(&d, &material(&[], false));
        assert_eq!(state(&d), (KeyState::Creating, None));
    }

    #[test]
    fn keys_and_material_listed_at_once_derive_every_key_from_its_material() {
        // The first lists of the two watches arrive together, on two tasks: a key derived
        // before its material was listed must not be stored after the material's own
        // re-derivation (which a server that just started would then serve as Creating).
        let keys: Vec<Key> = (0..2000)
            .map(|i| {
                let mut k = key(true);
                (k.info.name, k.info.uid, k.info.key_id) =
                    (format!("k{i}"), format!("uid-{i}"), format!("uid-{i}"));
                k
            })
            .collect();
        let materials: Vec<WrappedMaterial> = (0..2000)
            .map(|i| WrappedMaterial {
                uid: format!("uid-{i}"),
                key_id: format!("uid-{i}"),
                ..material(&[1], false)
            })
            .collect();
        for round in 0..20 {
            let d =
                Directory::new(Arc::new(RootKey::from_material(KeyMaterial::from_slice(&[3; 32]).unwrap())));
            let start = std::sync::Barrier::new(2);
            std::thread::scope(|scope| {
                scope.spawn(|| {
                    start.wait();
                    Feed::<Key>::replace_all(&d, keys.clone());
                });
                scope.spawn(|| {
                    start.wait();
                    Feed::<WrappedMaterial>::replace_all(&d, materials.clone());
                });
            });
            let creating = d.keys.filter(|k| k.info.state != KeyState::Enabled).len();
            assert_eq!(creating, 0, "round {round}: keys not derived from their material");
        }
    }

    #[test]
    fn a_restored_key_is_found_by_its_materials_key_id_not_its_uid() {
        let root = RootKey::from_material(KeyMaterial::generate().unwrap());
        let d = Directory::new(Arc::new(root));
        // In this cluster the KmsKey's UID is uid-1; its material keeps the keyId it had.
        const KEY_ID: &str = "6ece15cd-0195-4985-aff9-395763ad0a3b";
        let restored =
            |versions: &[u32]| WrappedMaterial { key_id: KEY_ID.into(), ..material(versions, false) };
        d.apply(restored(&[1, 2]));
        d.apply(key(true));
        assert_eq!(state(&d), (KeyState::Enabled, Some(2)));
        let k = d.resolve(KEY_ID).unwrap();
        assert_eq!((k.info.key_id.as_str(), k.info.uid.as_str()), (KEY_ID, "uid-1"));
        assert!(d.resolve("uid-1").is_none(), "the UID names no key once the material is known");
        // The material changes: the key is found and derived anew.
        d.apply(restored(&[1, 2, 3]));
        assert_eq!(state(&d), (KeyState::Enabled, Some(3)));
        Feed::<WrappedMaterial>::replace_all(&d, vec![restored(&[1, 2, 3, 4])]);
        assert_eq!(state(&d), (KeyState::Enabled, Some(4)));
        // Another key's material of the same keyId (never written by kubekms) is not this key's.
        let foreign = WrappedMaterial { uid: "uid-2".into(), ..restored(&[1, 2, 3, 4, 5]) };
        d.apply(foreign);
        assert_eq!(state(&d), (KeyState::Enabled, Some(4)));
    }
}
