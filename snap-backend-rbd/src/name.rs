//! RBD names: the disk name a user (or xl.cfg) gives, `rbd:POOL[/NAMESPACE]/IMAGE[@SNAP]
//! [:conf=PATH][:id=USER]` as QEMU and xl spell it, and the rules for pool, namespace, image,
//! snapshot and user names, checked before any `rbd` command runs.
//!
//! The rules are stricter than Ceph's own (which allow almost any byte): names are 1 to 127
//! characters from `A-Z a-z 0-9 + _ . -`, never starting with `-` (so nothing can reach the rbd
//! command as an option) and never `.` or `..`. That keeps every name safe in an rbd image
//! spec (`/` and `@` separate its parts), in QEMU's option syntax (`,` and `:` separate options)
//! and on a command line.

use std::fmt;
use std::path::{Path, PathBuf};

use snap_core::{Error, Result};

/// The longest pool, namespace, image, snapshot or user name accepted.
pub const MAX_NAME_LEN: usize = 127;

/// The longest `conf=` path accepted.
pub const MAX_CONF_LEN: usize = 4096;

/// The prefix of RBD disk names.
pub const PREFIX: &str = "rbd:";

/// Checks a pool, namespace, image, snapshot or user name (`what` names it in the message).
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(format!("RBD {what} name is empty")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::invalid(format!(
            "RBD {what} name is {} characters long; the limit is {MAX_NAME_LEN}",
            name.len()
        )));
    }
    if name.starts_with('-') {
        return Err(Error::invalid(format!(
            "RBD {what} name {name:?} starts with '-' (it would be taken for an option)"
        )));
    }
    if name == "." || name == ".." {
        return Err(Error::invalid(format!(
            "RBD {what} name {name:?} is reserved"
        )));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '_' | '.' | '-')))
    {
        return Err(Error::invalid(format!(
            "RBD {what} name {name:?} contains {bad:?}; allowed are A-Z a-z 0-9 + _ . -"
        )));
    }
    Ok(())
}

/// Validates an RBD snapshot name.
pub fn validate_snapshot_name(name: &str) -> Result<()> {
    snap_core::model::validate_snapshot_name(name)?;
    validate_name("snapshot", name)
}

fn validate_conf(conf: &str) -> Result<()> {
    if conf.is_empty() {
        return Err(Error::invalid("RBD option conf= is empty"));
    }
    if conf.len() > MAX_CONF_LEN {
        return Err(Error::invalid(format!(
            "RBD option conf= is {} bytes long; the limit is {MAX_CONF_LEN}",
            conf.len()
        )));
    }
    if conf.starts_with('-') {
        return Err(Error::invalid(format!(
            "RBD option conf={conf:?} starts with '-'"
        )));
    }
    if let Some(bad) = conf
        .chars()
        .find(|c| c.is_control() || matches!(c, ',' | ':' | '\\' | '@'))
    {
        return Err(Error::invalid(format!(
            "RBD option conf={conf:?} contains {bad:?}, which QEMU's rbd syntax cannot carry"
        )));
    }
    Ok(())
}

/// An RBD image (optionally one of its snapshots) and how to reach its cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RbdSpec {
    pool: String,
    namespace: Option<String>,
    image: String,
    snapshot: Option<String>,
    conf: Option<PathBuf>,
    user: Option<String>,
}

impl RbdSpec {
    /// An image spec from validated names, with no conf or user.
    pub fn new(pool: &str, image: &str) -> Result<Self> {
        validate_name("pool", pool)?;
        validate_name("image", image)?;
        Ok(RbdSpec {
            pool: pool.to_string(),
            namespace: None,
            image: image.to_string(),
            snapshot: None,
            conf: None,
            user: None,
        })
    }

    /// Parses `rbd:POOL[/NAMESPACE]/IMAGE[@SNAP][:conf=PATH][:id=USER]`. Other QEMU options
    /// (`mon_host=`, `key=`...), escapes (`\:`) and empty parts are refused.
    pub fn parse(disk: &str) -> Result<Self> {
        let rest = disk.strip_prefix(PREFIX).ok_or_else(|| {
            Error::invalid(format!(
                "{disk:?} is not an RBD disk name (rbd:POOL/IMAGE[:conf=PATH][:id=USER])"
            ))
        })?;
        let context = |e: Error| e.context(format!("RBD disk {disk:?}"));
        if rest.contains('\\') {
            return Err(context(Error::invalid(
                "escaped characters ('\\') are not supported",
            )));
        }
        let mut parts = rest.split(':');
        let path = parts.next().unwrap_or_default();
        let mut conf = None;
        let mut user = None;
        for option in parts {
            let (key, value) = option.split_once('=').ok_or_else(|| {
                context(Error::invalid(format!(
                    "option {option:?} is not KEY=VALUE"
                )))
            })?;
            match key {
                "conf" if conf.is_none() => {
                    validate_conf(value).map_err(context)?;
                    conf = Some(PathBuf::from(value));
                }
                "id" if user.is_none() => {
                    validate_name("user", value).map_err(context)?;
                    user = Some(value.to_string());
                }
                "conf" | "id" => {
                    return Err(context(Error::invalid(format!("option {key} given twice"))));
                }
                other => {
                    return Err(context(Error::invalid(format!(
                        "option {other:?} is not supported (only conf= and id=)"
                    ))));
                }
            }
        }
        let (names, snapshot) = match path.split_once('@') {
            Some((names, snap)) => {
                validate_name("snapshot", snap).map_err(context)?;
                (names, Some(snap.to_string()))
            }
            None => (path, None),
        };
        let pieces: Vec<&str> = names.split('/').collect();
        let (pool, namespace, image) = match pieces.as_slice() {
            [pool, image] => (*pool, None, *image),
            [pool, ns, image] => (*pool, Some(*ns), *image),
            _ => {
                return Err(context(Error::invalid(
                    "expected POOL/IMAGE or POOL/NAMESPACE/IMAGE after rbd:",
                )));
            }
        };
        validate_name("pool", pool).map_err(context)?;
        if let Some(ns) = namespace {
            validate_name("namespace", ns).map_err(context)?;
        }
        validate_name("image", image).map_err(context)?;
        Ok(RbdSpec {
            pool: pool.to_string(),
            namespace: namespace.map(str::to_string),
            image: image.to_string(),
            snapshot,
            conf,
            user,
        })
    }

    /// Parses a disk given as a path (the CLI's IMAGE argument).
    pub fn from_path(path: &Path) -> Result<Self> {
        let text = path.to_str().ok_or_else(|| {
            Error::invalid(format!("RBD disk name {} is not UTF-8", path.display()))
        })?;
        Self::parse(text)
    }

    /// Whether `disk` starts like an RBD disk name.
    pub fn looks_like(disk: &str) -> bool {
        disk.starts_with(PREFIX)
    }

    /// The pool.
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// The namespace, if any.
    pub fn namespace(&self) -> Option<&str> {
        self.namespace.as_deref()
    }

    /// The image name.
    pub fn image(&self) -> &str {
        &self.image
    }

    /// The snapshot, when the name has `@SNAP`.
    pub fn snapshot(&self) -> Option<&str> {
        self.snapshot.as_deref()
    }

    /// The `conf=` path, if given.
    pub fn conf(&self) -> Option<&Path> {
        self.conf.as_deref()
    }

    /// The `id=` user, if given.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The same image without a snapshot.
    pub fn without_snapshot(&self) -> RbdSpec {
        RbdSpec {
            snapshot: None,
            ..self.clone()
        }
    }

    /// This image's snapshot `name` (validated).
    pub fn at_snapshot(&self, name: &str) -> Result<RbdSpec> {
        validate_snapshot_name(name)?;
        Ok(RbdSpec {
            snapshot: Some(name.to_string()),
            ..self.clone()
        })
    }

    /// Another image in the same cluster (same conf and user), in `pool`/`namespace`.
    pub fn sibling(&self, pool: &str, namespace: Option<&str>, image: &str) -> Result<RbdSpec> {
        validate_name("pool", pool)?;
        if let Some(ns) = namespace {
            validate_name("namespace", ns)?;
        }
        validate_name("image", image)?;
        Ok(RbdSpec {
            pool: pool.to_string(),
            namespace: namespace.filter(|n| !n.is_empty()).map(str::to_string),
            image: image.to_string(),
            snapshot: None,
            conf: self.conf.clone(),
            user: self.user.clone(),
        })
    }

    /// Takes `conf` and `user` from `other` where this spec has none.
    pub fn inherit_cluster(mut self, other: &RbdSpec) -> RbdSpec {
        if self.conf.is_none() {
            self.conf = other.conf.clone();
        }
        if self.user.is_none() {
            self.user = other.user.clone();
        }
        self
    }

    /// Whether both name the same image (pool, namespace, image; snapshot, conf and user
    /// ignored).
    pub fn same_image(&self, other: &RbdSpec) -> bool {
        self.pool == other.pool && self.namespace == other.namespace && self.image == other.image
    }

    /// Whether both reach the cluster the same way (conf and user).
    pub fn same_cluster(&self, other: &RbdSpec) -> bool {
        self.conf == other.conf && self.user == other.user
    }

    /// The rbd command's image spec: `POOL[/NAMESPACE]/IMAGE[@SNAP]`.
    pub fn arg(&self) -> String {
        let mut s = self.image_arg();
        if let Some(snap) = &self.snapshot {
            s.push('@');
            s.push_str(snap);
        }
        s
    }

    /// `POOL[/NAMESPACE]/IMAGE`, without the snapshot.
    pub fn image_arg(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{}/{ns}/{}", self.pool, self.image),
            None => format!("{}/{}", self.pool, self.image),
        }
    }

    /// The disk name as a path (what listings and outcomes carry).
    pub fn to_path(&self) -> PathBuf {
        PathBuf::from(self.to_string())
    }

    /// QEMU's `-blockdev driver=rbd,...` options (without node-name): pool, namespace, image,
    /// snapshot, conf (this spec's, else `default_conf`, e.g. from `CEPH_CONF`) and user.
    pub fn blockdev_options(&self, default_conf: Option<&Path>) -> Result<String> {
        let mut opts = format!("driver=rbd,pool={}", self.pool);
        if let Some(ns) = &self.namespace {
            opts.push_str(&format!(",namespace={ns}"));
        }
        opts.push_str(&format!(",image={}", self.image));
        if let Some(snap) = &self.snapshot {
            opts.push_str(&format!(",snapshot={snap}"));
        }
        if let Some(conf) = self.conf.as_deref().or(default_conf) {
            let text = conf.to_str().ok_or_else(|| {
                Error::invalid(format!("RBD conf path {} is not UTF-8", conf.display()))
            })?;
            validate_conf(text)?;
            opts.push_str(&format!(",conf={text}"));
        }
        if let Some(user) = &self.user {
            opts.push_str(&format!(",user={user}"));
        }
        Ok(opts)
    }
}

impl RbdSpec {
    /// QEMU's rbd node options as QMP `blockdev-add` arguments (without `node-name`): the same
    /// fields as [`blockdev_options`](Self::blockdev_options).
    pub fn blockdev_json(&self, default_conf: Option<&Path>) -> Result<serde_json::Value> {
        let mut opts = serde_json::Map::new();
        let mut put = |k: &str, v: &str| {
            opts.insert(k.to_string(), serde_json::Value::String(v.to_string()));
        };
        put("driver", "rbd");
        put("pool", &self.pool);
        if let Some(ns) = &self.namespace {
            put("namespace", ns);
        }
        put("image", &self.image);
        if let Some(snap) = &self.snapshot {
            put("snapshot", snap);
        }
        if let Some(conf) = self.conf.as_deref().or(default_conf) {
            let text = conf.to_str().ok_or_else(|| {
                Error::invalid(format!("RBD conf path {} is not UTF-8", conf.display()))
            })?;
            validate_conf(text)?;
            put("conf", text);
        }
        if let Some(user) = &self.user {
            put("user", user);
        }
        Ok(serde_json::Value::Object(opts))
    }
}

impl fmt::Display for RbdSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.arg())?;
        if let Some(conf) = &self.conf {
            write!(f, ":conf={}", conf.display())?;
        }
        if let Some(user) = &self.user {
            write!(f, ":id={user}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_names() {
        let s = RbdSpec::parse("rbd:vms/disk1").unwrap();
        assert_eq!((s.pool(), s.image()), ("vms", "disk1"));
        assert_eq!(s.namespace(), None);
        assert_eq!(s.arg(), "vms/disk1");
        assert_eq!(s.to_string(), "rbd:vms/disk1");
        let s = RbdSpec::parse("rbd:vms/ns1/disk1@s1:conf=/etc/ceph/x.conf:id=admin").unwrap();
        assert_eq!(s.namespace(), Some("ns1"));
        assert_eq!(s.snapshot(), Some("s1"));
        assert_eq!(s.conf(), Some(Path::new("/etc/ceph/x.conf")));
        assert_eq!(s.user(), Some("admin"));
        assert_eq!(s.arg(), "vms/ns1/disk1@s1");
        assert_eq!(
            s.to_string(),
            "rbd:vms/ns1/disk1@s1:conf=/etc/ceph/x.conf:id=admin"
        );
        assert_eq!(RbdSpec::parse(&s.to_string()).unwrap(), s);
        assert_eq!(
            s.blockdev_options(None).unwrap(),
            "driver=rbd,pool=vms,namespace=ns1,image=disk1,snapshot=s1,conf=/etc/ceph/x.conf,user=admin"
        );
        let plain = RbdSpec::parse("rbd:p/i").unwrap();
        assert_eq!(
            plain
                .blockdev_options(Some(Path::new("/tmp/c.conf")))
                .unwrap(),
            "driver=rbd,pool=p,image=i,conf=/tmp/c.conf"
        );
        assert!(
            plain
                .blockdev_options(Some(Path::new("/tmp/a,b.conf")))
                .is_err()
        );
        assert_eq!(
            s.blockdev_json(None).unwrap(),
            serde_json::json!({"driver": "rbd", "pool": "vms", "namespace": "ns1", "image": "disk1",
                "snapshot": "s1", "conf": "/etc/ceph/x.conf", "user": "admin"})
        );
        assert_eq!(
            plain.blockdev_json(Some(Path::new("/tmp/c.conf"))).unwrap(),
            serde_json::json!({"driver": "rbd", "pool": "p", "image": "i", "conf": "/tmp/c.conf"})
        );
        assert!(
            plain
                .blockdev_json(Some(Path::new("/tmp/a,b.conf")))
                .is_err()
        );
    }

    #[test]
    fn refuses_bad_names() {
        for bad in [
            "vms/disk",
            "rbd:",
            "rbd:vms",
            "rbd:/disk",
            "rbd:vms/",
            "rbd:-p/disk",
            "rbd:vms/-disk",
            "rbd:vms/a/b/c",
            "rbd:vms/a b",
            "rbd:vms/a,b",
            "rbd:vms/disk@",
            "rbd:vms/disk@-s",
            "rbd:vms/disk:mon_host=1.2.3.4",
            "rbd:vms/disk:conf=",
            "rbd:vms/disk:conf=/a,b",
            "rbd:vms/disk:id=-x",
            "rbd:vms/disk:id=a:id=b",
            "rbd:vms/disk:noequals",
            "rbd:vms/di\\:sk",
            "rbd:../disk",
            "rbd:vms/..",
            "rbd:vms/dïsk",
        ] {
            let e = RbdSpec::parse(bad).unwrap_err();
            assert_eq!(e.kind(), snap_core::ErrorKind::InvalidInput, "{bad}: {e}");
        }
        assert!(validate_snapshot_name("s1.before-upgrade_2+x").is_ok());
        assert!(validate_snapshot_name("a@b").is_err());
        assert!(validate_snapshot_name("a/b").is_err());
        assert!(validate_snapshot_name(&"a".repeat(128)).is_err());
        assert!(validate_snapshot_name("--force").is_err());
    }

    #[test]
    fn siblings_keep_the_cluster() {
        let s = RbdSpec::parse("rbd:vms/disk:conf=/c.conf:id=u").unwrap();
        let o = s.sibling("other", None, "disk.s1").unwrap();
        assert_eq!(o.to_string(), "rbd:other/disk.s1:conf=/c.conf:id=u");
        assert!(o.same_cluster(&s));
        assert!(!o.same_image(&s));
        let bare = RbdSpec::parse("rbd:vms/x").unwrap().inherit_cluster(&s);
        assert_eq!(bare.conf(), Some(Path::new("/c.conf")));
        assert!(s.at_snapshot("a").unwrap().same_image(&s));
        assert!(s.at_snapshot("-a").is_err());
    }
}
