//! LVM names: the disk name a user gives (`/dev/VG/LV` or `VG/LV`) and lvm2's rules for VG and LV
//! names, checked before any lvm2 command runs.

use std::fmt;

use snap_core::{Error, Result};

/// lvm2's limit on VG and LV names (`NAME_LEN` is 128 including the terminating NUL).
pub const MAX_NAME_LEN: usize = 127;

/// Substrings lvm2 reserves for its internal LVs; an LV name may not contain them.
const RESERVED_INFIXES: [&str; 15] = [
    "_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_mimage", "_mlog", "_pmspare", "_rimage",
    "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin", "_wcorig",
];

/// Prefixes lvm2 reserves for LV names.
const RESERVED_PREFIXES: [&str; 2] = ["snapshot", "pvmove"];

/// Checks the rules lvm2 applies to every VG and LV name: 1 to 127 characters from
/// `A-Z a-z 0-9 + _ . -`, not starting with `-`, and not `.` or `..`.
fn validate_common(what: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::invalid(format!("{what} name is empty")));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(Error::invalid(format!(
            "{what} name is {} characters long; lvm2 allows {MAX_NAME_LEN}",
            name.len()
        )));
    }
    if name.starts_with('-') {
        return Err(Error::invalid(format!(
            "{what} name {name:?} starts with '-' (it would be taken for an option)"
        )));
    }
    if name == "." || name == ".." {
        return Err(Error::invalid(format!("{what} name {name:?} is reserved")));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '_' | '.' | '-')))
    {
        return Err(Error::invalid(format!(
            "{what} name {name:?} contains {bad:?}; lvm2 allows only A-Z a-z 0-9 + _ . -"
        )));
    }
    Ok(())
}

/// Validates a volume group name as lvm2 does.
pub fn validate_vg_name(name: &str) -> Result<()> {
    validate_common("volume group", name)
}

/// Validates a logical volume name (also a snapshot LV's name) as lvm2 does, including its
/// reserved prefixes (`snapshot`, `pvmove`) and internal suffixes (`_tmeta`, `_rimage`...).
pub fn validate_lv_name(name: &str) -> Result<()> {
    validate_common("logical volume", name)?;
    if let Some(prefix) = RESERVED_PREFIXES.iter().find(|p| name.starts_with(*p)) {
        return Err(Error::invalid(format!(
            "logical volume name {name:?} starts with {prefix:?}, which lvm2 reserves"
        )));
    }
    if let Some(infix) = RESERVED_INFIXES.iter().find(|i| name.contains(*i)) {
        return Err(Error::invalid(format!(
            "logical volume name {name:?} contains {infix:?}, which lvm2 reserves for internal volumes"
        )));
    }
    Ok(())
}

/// A logical volume: volume group and LV name, both validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LvRef {
    vg: String,
    lv: String,
}

impl LvRef {
    /// A reference from validated VG and LV names.
    pub fn new(vg: &str, lv: &str) -> Result<Self> {
        validate_vg_name(vg)?;
        validate_lv_name(lv)?;
        Ok(LvRef {
            vg: vg.to_string(),
            lv: lv.to_string(),
        })
    }

    /// Parses a disk name as given on the command line: `/dev/VG/LV` or `VG/LV`.
    pub fn parse(disk: &str) -> Result<Self> {
        let rest = disk.strip_prefix("/dev/").unwrap_or(disk);
        if rest.starts_with("mapper/") {
            return Err(Error::invalid(format!(
                "{disk:?} is a device-mapper name; give the LVM disk as /dev/VG/LV or VG/LV"
            )));
        }
        let mut parts = rest.split('/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(vg), Some(lv), None) => {
                Self::new(vg, lv).map_err(|e| e.context(format!("LVM disk {disk:?}")))
            }
            _ => Err(Error::invalid(format!(
                "LVM disk {disk:?} is not of the form /dev/VG/LV or VG/LV"
            ))),
        }
    }

    /// Whether `disk` has the shape of an LVM disk name (`/dev/VG/LV` or `VG/LV`, valid names);
    /// a hint for format detection, which should still prefer an explicit `--format lvm`.
    pub fn looks_like(disk: &str) -> bool {
        Self::parse(disk).is_ok()
    }

    /// The volume group.
    pub fn vg(&self) -> &str {
        &self.vg
    }

    /// The LV name.
    pub fn lv(&self) -> &str {
        &self.lv
    }

    /// Another LV of the same volume group (validated).
    pub fn sibling(&self, lv: &str) -> Result<Self> {
        Self::new(&self.vg, lv)
    }

    /// `VG/LV`, as lvm2 commands take it.
    pub fn arg(&self) -> String {
        format!("{}/{}", self.vg, self.lv)
    }

    /// `/dev/VG/LV`.
    pub fn dev_path(&self) -> String {
        format!("/dev/{}/{}", self.vg, self.lv)
    }
}

impl fmt::Display for LvRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.vg, self.lv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snap_core::ErrorKind;

    #[test]
    fn parses_both_forms() {
        let a = LvRef::parse("/dev/vg0/root").unwrap();
        let b = LvRef::parse("vg0/root").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.vg(), "vg0");
        assert_eq!(a.lv(), "root");
        assert_eq!(a.arg(), "vg0/root");
        assert_eq!(a.dev_path(), "/dev/vg0/root");
        assert!(LvRef::parse("a.b+c_d-e/x-y.z").is_ok());
    }

    #[test]
    fn refuses_bad_shapes() {
        for bad in [
            "",
            "vg0",
            "/dev/vg0",
            "/dev/vg0/a/b",
            "vg0/",
            "/vg0/lv",
            "/dev/mapper/vg0-lv",
            "vg 0/lv",
            "vg0/l v",
            "vg0/lv\n",
        ] {
            let e = LvRef::parse(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{bad:?}");
        }
    }

    #[test]
    fn no_option_injection() {
        for bad in ["-vg/lv", "vg/-lv", "/dev/--force/lv", "vg/--yes"] {
            let e = LvRef::parse(bad).unwrap_err();
            assert!(e.message().contains("starts with '-'"), "{bad:?}: {e}");
        }
        assert!(validate_lv_name("-s").is_err());
        assert!(validate_vg_name("-ff").is_err());
    }

    #[test]
    fn lvm2_reserved_names() {
        assert!(validate_lv_name("snapshot0").is_err());
        assert!(validate_lv_name("pvmove1").is_err());
        assert!(validate_lv_name("pool_tmeta").is_err());
        assert!(validate_lv_name("x_rimage_0").is_err());
        assert!(validate_lv_name(".").is_err());
        assert!(validate_lv_name("..").is_err());
        assert!(validate_lv_name("my.snap-1+2_3").is_ok());
        assert!(validate_lv_name(&"a".repeat(127)).is_ok());
        assert!(validate_lv_name(&"a".repeat(128)).is_err());
        assert!(validate_lv_name("snäp").is_err());
        assert!(validate_lv_name("a/b").is_err());
    }
}
