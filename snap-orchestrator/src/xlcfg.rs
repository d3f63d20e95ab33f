//! xl.cfg: the Xen domain configuration file (xl.cfg(5)), parsed into a [`DomainConfig`] and
//! rendered back.
//!
//! The syntax is libxlu's (tools/libs/util/libxlu_cfg_l.l and libxlu_cfg_y.y in Xen):
//! - settings `KEY = VALUE`, separated by newlines or `;`; `#` starts a comment that runs to the end
//!   of the line; blank lines are ignored;
//! - a key is `[A-Za-z_][A-Za-z0-9_.]*`;
//! - a value is a string in double or single quotes (both take the backslash escapes `\" \' \\ \a
//!   \b \f \n \r \t \v` and, as an extension, `\xHH` for an ASCII character; a string ends on the
//!   line it starts), an integer (decimal, octal with a leading `0`, hexadecimal with `0x`; a
//!   leading `-` is accepted as an extension) or a list `[ v, v, ... ]` that may span lines, hold
//!   comments and end with a trailing comma; lists may nest up to [`MAX_LIST_DEPTH`] levels.
//!
//! The keys snapctl uses get typed fields; every other key is kept in `other`, in file order, so
//! [`DomainConfig::to_xl`] writes it back. `disk = [...]` entries follow xl-disk-configuration(5)
//! (tools/libs/util/libxlu_disk_l.l): see [`parse_disk_spec`].
//!
//! Stricter than xl on purpose: a key set twice, `+=`, an integer written as a string, a domain name
//! that is unusable in a file name, two disks with one vdev, `maxmem` below `memory` are errors.
//! The parser never panics, refuses input over 16 MiB ([`parse_file`]: over 1 MiB) and bounds the
//! number of settings, list items and list nesting.

use std::collections::{HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// [`parse_file`] refuses files larger than this.
const MAX_FILE_BYTES: usize = 1 << 20;
/// [`parse`] refuses text larger than this (room for what [`DomainConfig::to_xl`] makes of a
/// 1 MiB file: an escaped control character takes four bytes).
const MAX_TEXT_BYTES: usize = 16 << 20;
const MAX_SETTINGS: usize = 4096;
const MAX_LIST_ITEMS: usize = 4096;
/// Lists nest at most this deep (`[[[[1]]]]` is the deepest).
pub const MAX_LIST_DEPTH: usize = 4;
const MAX_KEY_LEN: usize = 128;
const MAX_NAME_LEN: usize = 128;
const MAX_VDEV_LEN: usize = 32;
const MAX_DISK_SPEC_LEN: usize = 8192;
const DEFAULT_MEMORY_MIB: u64 = 128;

/// The keys that have typed fields in [`DomainConfig`]; everything else goes to `other`.
const TYPED_KEYS: [&str; 12] = [
    "name", "uuid", "memory", "maxmem", "vcpus", "kernel", "ramdisk", "extra", "root", "serial",
    "vif", "disk",
];

/// A parsed xl.cfg.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainConfig {
    /// `name`: required; `[A-Za-z0-9_.-]`, not `.` or `..` (it is used in file names).
    pub name: String,
    /// `uuid`, as written (checked to be `8-4-4-4-12` hex digits).
    pub uuid: Option<String>,
    /// `memory` in MiB; 128 when absent; at least 1.
    pub memory_mib: u64,
    /// `maxmem` in MiB; not below `memory`.
    pub maxmem_mib: Option<u64>,
    /// `vcpus`; 1 when absent; at least 1.
    pub vcpus: u32,
    /// `kernel`.
    pub kernel: Option<PathBuf>,
    /// `ramdisk`.
    pub ramdisk: Option<PathBuf>,
    /// `extra`: the kernel command line.
    pub extra: Option<String>,
    /// `root` (xl appends `root=ROOT` to the command line).
    pub root: Option<String>,
    /// `serial`, e.g. `file:/path`; for a list value, its first element.
    pub serial: Option<String>,
    /// `vif = [...]`, the specs as written.
    pub vifs: Vec<String>,
    /// `disk = [...]`.
    pub disks: Vec<DiskSpec>,
    /// Every other key, in file order, with its value as parsed.
    pub other: Vec<(String, Value)>,
}

impl Default for DomainConfig {
    /// What an xl.cfg with only a name gives, minus the name (empty, so not valid as is): 128 MiB,
    /// one vcpu, nothing else.
    fn default() -> Self {
        DomainConfig {
            name: String::new(),
            uuid: None,
            memory_mib: DEFAULT_MEMORY_MIB,
            maxmem_mib: None,
            vcpus: 1,
            kernel: None,
            ramdisk: None,
            extra: None,
            root: None,
            serial: None,
            vifs: Vec::new(),
            disks: Vec::new(),
            other: Vec::new(),
        }
    }
}

/// A value of a key snapctl does not interpret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    /// A quoted string (unescaped).
    Str(String),
    /// An integer.
    Int(i64),
    /// A list.
    List(Vec<Value>),
}

/// One `disk = [...]` entry (xl-disk-configuration(5)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// A path, `/dev/VG/LV`, `rbd:...`, or `""` for an empty cdrom drive.
    pub target: String,
    /// `raw` unless given; `empty` exactly for an empty cdrom drive.
    pub format: DiskFormat,
    /// The device the guest sees (`xvda`, `hda`, `sdb`...): ASCII letters and digits.
    pub vdev: String,
    /// `rw` unless given; always `ro` for a cdrom (as xl does).
    pub access: DiskAccess,
    /// `phy`, `qdisk`, `tap` (or `standalone`); the legacy prefix `phy:` sets `phy`.
    pub backendtype: Option<String>,
    /// `cdrom` or `disk` when given.
    pub devtype: Option<String>,
    /// The spec as written; parameters snapctl does not model (`backend=`, `script=`, `discard`,
    /// COLO settings...) live only here, and [`DiskSpec::to_spec`] carries them over.
    pub spec: String,
}

/// A disk image format as xl names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    Raw,
    Qcow,
    Qcow2,
    Vhd,
    Qed,
    /// An empty cdrom drive.
    Empty,
}

impl DiskFormat {
    /// The xl name (`raw`, `qcow2`...).
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow => "qcow",
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Vhd => "vhd",
            DiskFormat::Qed => "qed",
            DiskFormat::Empty => "empty",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "raw" => DiskFormat::Raw,
            "qcow" => DiskFormat::Qcow,
            "qcow2" => DiskFormat::Qcow2,
            "vhd" => DiskFormat::Vhd,
            "qed" => DiskFormat::Qed,
            "empty" => DiskFormat::Empty,
            _ => return None,
        })
    }
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether the guest may write the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DiskAccess {
    #[serde(rename = "rw")]
    ReadWrite,
    #[serde(rename = "ro")]
    ReadOnly,
}

impl DiskAccess {
    /// `rw` or `ro`.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskAccess::ReadWrite => "rw",
            DiskAccess::ReadOnly => "ro",
        }
    }
}

/// Why an xl.cfg was refused: the line (1-based; 0 when the problem is not on one line, e.g. a
/// missing `name`), the key concerned, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParseError {
    pub line: usize,
    pub key: Option<String>,
    pub message: String,
}

impl ParseError {
    fn new(line: usize, key: Option<&str>, message: impl Into<String>) -> Self {
        ParseError {
            line,
            key: key.map(str::to_string),
            message: message.into(),
        }
    }
}

impl fmt::Display for ParseError {
    /// `line 3: key `memory`: expected an integer, found a string` (parts left out when unknown).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "line {}: ", self.line)?;
        }
        if let Some(key) = &self.key {
            write!(f, "key `{key}`: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ParseError {}

impl From<ParseError> for snap_core::Error {
    fn from(e: ParseError) -> Self {
        snap_core::Error::invalid(format!("xl.cfg {e}"))
    }
}

/// Parses xl.cfg text.
pub fn parse(text: &str) -> Result<DomainConfig, ParseError> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(ParseError::new(
            0,
            None,
            format!(
                "the configuration is {} bytes; refusing more than {MAX_TEXT_BYTES}",
                text.len()
            ),
        ));
    }
    let settings = Lexer::new(text).settings()?;
    build(settings)
}

/// Reads and parses an xl.cfg file (a regular file of at most 1 MiB of UTF-8 text). Errors are
/// [`snap_core::ErrorKind::InvalidInput`] (or I/O kinds) and name the file, the line and the key.
pub fn parse_file(path: &Path) -> snap_core::Result<DomainConfig> {
    use snap_core::Error;
    let meta = std::fs::metadata(path).map_err(|e| Error::io("read xl.cfg", e).with_path(path))?;
    if !meta.is_file() {
        return Err(Error::invalid("xl.cfg: not a regular file").with_path(path));
    }
    let file =
        std::fs::File::open(path).map_err(|e| Error::io("open xl.cfg", e).with_path(path))?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io("read xl.cfg", e).with_path(path))?;
    if bytes.len() > MAX_FILE_BYTES {
        return Err(Error::invalid(format!(
            "xl.cfg is larger than {MAX_FILE_BYTES} bytes (1 MiB); refusing to read it"
        ))
        .with_path(path));
    }
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let bytes = e.into_bytes();
            let line = 1 + bytes
                .get(..valid)
                .map_or(0, |b| b.iter().filter(|&&c| c == b'\n').count());
            let err = ParseError::new(line, None, "not UTF-8 text");
            return Err(Error::from(err).with_path(path));
        }
    };
    parse(&text).map_err(|e| Error::from(e).with_path(path))
}

/// Parses one disk spec (xl-disk-configuration(5)).
///
/// Comma-separated parameters: `key=value` (`target`, `format`, `vdev`, `access`, `backendtype`,
/// `devtype`; `backend`, `script`, `specification`, `colo-host`, `colo-port`, `colo-export`,
/// `active-disk`, `hidden-disk`, `grant_usage` are checked and kept in `spec` only), flags
/// (`cdrom`; `discard`, `no-discard`, `direct-io-safe`, `colo`, `no-colo`, `trusted`, `untrusted`
/// kept in `spec` only) and positional parameters filling target, format, vdev, access in that
/// order (an empty one takes the default). `target=` takes the rest of the spec, commas included
/// (one trailing comma dropped), so it comes last. The legacy target prefixes `raw:`, `qcow:`,
/// `qcow2:`, `vhd:` (formats, unless `format=` is given), `phy:` (backendtype phy), `file:`,
/// `tap:`, `tap2:`, `tapdisk:`, `aio:`, `ioemu:` (ignored) and `iscsi:`, `nbd:`, `enbd:`, `drbd:`
/// (`script=block-NAME`) are stripped; after one, the format is not positional
/// (`raw:/img,hda,w`); a vdev may carry `:cdrom`/`:disk` (`hdc:cdrom`).
pub fn parse_disk_spec(spec: &str) -> Result<DiskSpec, String> {
    parse_disk(spec).map(|(disk, _)| disk)
}

impl DomainConfig {
    /// Makes relative paths absolute under `base` (usually the config file's folder): `kernel`,
    /// `ramdisk`, `serial = "file:PATH"` and disk targets. Left alone: absolute paths, empty
    /// targets, targets that start like a protocol (`rbd:`, `nbd:`...), targets of disks with a
    /// `script=` or `backendtype=phy` (not file paths), and everything when the joined path is not
    /// UTF-8. A changed disk gets its canonical [`DiskSpec::to_spec`] as `spec`.
    pub fn resolve_relative(&mut self, base: &Path) {
        for path in [&mut self.kernel, &mut self.ramdisk].into_iter().flatten() {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
        if let Some(serial) = &mut self.serial
            && let Some(file) = serial.strip_prefix("file:")
            && !file.is_empty()
            && Path::new(file).is_relative()
            && let Some(joined) = base.join(file).to_str()
        {
            *serial = format!("file:{joined}");
        }
        for disk in &mut self.disks {
            let extras = parse_disk(&disk.spec).map(|(_, e)| e).unwrap_or_default();
            let scripted = extras.iter().any(|e| e.starts_with("script="));
            if disk.target.is_empty()
                || Path::new(&disk.target).is_absolute()
                || has_protocol_prefix(&disk.target)
                || scripted
                || disk.backendtype.as_deref() == Some("phy")
            {
                continue;
            }
            let Some(joined) = base.join(&disk.target).to_str().map(str::to_string) else {
                continue;
            };
            disk.target = joined;
            disk.spec = disk.to_spec();
        }
    }

    /// Renders the configuration as xl.cfg text that [`parse`] reads back equal (for a config that
    /// [`parse`] accepts, and any config whose fields obey the same rules). A disk is written as
    /// its `spec` when that still says what the fields say, else in canonical form. `other`
    /// entries that could not be read back (a key that is not an identifier, one of the typed keys,
    /// or a repeat) are left out.
    pub fn to_xl(&self) -> String {
        let mut out = String::new();
        let mut set = |key: &str, value: &str| {
            let _ = writeln!(out, "{key} = {value}");
        };
        set("name", &quote(&self.name));
        if let Some(uuid) = &self.uuid {
            set("uuid", &quote(uuid));
        }
        set("memory", &self.memory_mib.to_string());
        if let Some(maxmem) = self.maxmem_mib {
            set("maxmem", &maxmem.to_string());
        }
        set("vcpus", &self.vcpus.to_string());
        if let Some(kernel) = &self.kernel {
            set("kernel", &quote(&kernel.to_string_lossy()));
        }
        if let Some(ramdisk) = &self.ramdisk {
            set("ramdisk", &quote(&ramdisk.to_string_lossy()));
        }
        if let Some(extra) = &self.extra {
            set("extra", &quote(extra));
        }
        if let Some(root) = &self.root {
            set("root", &quote(root));
        }
        if let Some(serial) = &self.serial {
            set("serial", &quote(serial));
        }
        if !self.vifs.is_empty() {
            let items: Vec<String> = self.vifs.iter().map(|v| quote(v)).collect();
            set("vif", &format!("[ {} ]", items.join(", ")));
        }
        if !self.disks.is_empty() {
            let mut list = String::from("[\n");
            for disk in &self.disks {
                let spec = match parse_disk_spec(&disk.spec) {
                    Ok(parsed) if parsed == *disk => disk.spec.clone(),
                    _ => disk.to_spec(),
                };
                let _ = writeln!(list, "    {},", quote(&spec));
            }
            list.push(']');
            set("disk", &list);
        }
        let mut seen = HashSet::new();
        for (key, value) in &self.other {
            if !is_key(key) || TYPED_KEYS.contains(&key.as_str()) || !seen.insert(key.as_str()) {
                continue;
            }
            set(key, &render_value(value));
        }
        out
    }

    /// The disk the guest sees as `vdev`.
    pub fn disk(&self, vdev: &str) -> Option<&DiskSpec> {
        self.disks.iter().find(|d| d.vdev == vdev)
    }

    /// The console log file for `serial = "file:PATH"`.
    pub fn serial_file(&self) -> Option<PathBuf> {
        let file = self.serial.as_deref()?.strip_prefix("file:")?;
        (!file.is_empty()).then(|| PathBuf::from(file))
    }
}

impl DiskSpec {
    /// The canonical keyed form, `format=qcow2,vdev=xvda,access=rw,target=/p`, with `backendtype=`,
    /// `devtype=` and the parameters only `spec` holds (`backend=`, `script=`, `discard`...) before
    /// the target, which comes last (a target ending in `,` gets one more, which the parser drops).
    pub fn to_spec(&self) -> String {
        let mut out = format!(
            "format={},vdev={},access={}",
            self.format.as_str(),
            self.vdev,
            self.access.as_str()
        );
        if let Some(backendtype) = &self.backendtype {
            let _ = write!(out, ",backendtype={backendtype}");
        }
        if let Some(devtype) = &self.devtype {
            let _ = write!(out, ",devtype={devtype}");
        }
        for extra in parse_disk(&self.spec).map(|(_, e)| e).unwrap_or_default() {
            out.push(',');
            out.push_str(&extra);
        }
        out.push_str(",target=");
        out.push_str(&self.target);
        if self.target.ends_with(',') {
            out.push(',');
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Lexing and parsing the file

/// One `KEY = VALUE`.
#[derive(Debug)]
struct Setting {
    key: String,
    line: usize,
    value: Node,
}

/// A value with the line it starts on.
#[derive(Debug)]
struct Node {
    line: usize,
    kind: NodeKind,
}

#[derive(Debug)]
enum NodeKind {
    Str(String),
    Int(i64),
    List(Vec<Node>),
}

impl Node {
    fn into_value(self) -> Value {
        match self.kind {
            NodeKind::Str(s) => Value::Str(s),
            NodeKind::Int(i) => Value::Int(i),
            NodeKind::List(items) => Value::List(items.into_iter().map(Node::into_value).collect()),
        }
    }

    fn describe(&self) -> &'static str {
        match self.kind {
            NodeKind::Str(_) => "a string",
            NodeKind::Int(_) => "an integer",
            NodeKind::List(_) => "a list",
        }
    }
}

struct Lexer<'a> {
    src: &'a str,
    bytes: &'a [u8],
    pos: usize,
    line: usize,
}

impl<'a> Lexer<'a> {
    fn new(src: &'a str) -> Self {
        Lexer {
            src,
            bytes: src.as_bytes(),
            pos: 0,
            line: 1,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn peek_at(&self, offset: usize) -> Option<u8> {
        self.bytes.get(self.pos + offset).copied()
    }

    /// Spaces, tabs and carriage returns (CRLF files are read as LF files).
    fn skip_blanks(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r')) {
            self.pos += 1;
        }
    }

    fn skip_comment(&mut self) {
        if self.peek() == Some(b'#') {
            while !matches!(self.peek(), None | Some(b'\n')) {
                self.pos += 1;
            }
        }
    }

    /// Inside a list: blanks, newlines and comments.
    fn skip_list_space(&mut self) {
        loop {
            self.skip_blanks();
            match self.peek() {
                Some(b'\n') => {
                    self.pos += 1;
                    self.line += 1;
                }
                Some(b'#') => self.skip_comment(),
                _ => return,
            }
        }
    }

    /// A few characters from the current position, for messages.
    fn near(&self) -> String {
        let rest = self.src.get(self.pos..).unwrap_or("");
        let line = rest.split('\n').next().unwrap_or("");
        show(line, 20)
    }

    fn slice(&self, start: usize, end: usize) -> &'a str {
        self.src.get(start..end).unwrap_or("")
    }

    fn settings(mut self) -> Result<Vec<Setting>, ParseError> {
        let mut settings: Vec<Setting> = Vec::new();
        let mut first_line: HashMap<String, usize> = HashMap::new();
        loop {
            self.skip_blanks();
            match self.peek() {
                None => return Ok(settings),
                Some(b'\n') => {
                    self.pos += 1;
                    self.line += 1;
                }
                Some(b';') => self.pos += 1,
                Some(b'#') => self.skip_comment(),
                Some(b) if b.is_ascii_alphabetic() || b == b'_' => {
                    let line = self.line;
                    let key = self.key()?;
                    if let Some(first) = first_line.get(&key) {
                        return Err(ParseError::new(
                            line,
                            Some(&key),
                            format!("duplicate key (first set on line {first})"),
                        ));
                    }
                    if settings.len() >= MAX_SETTINGS {
                        return Err(ParseError::new(
                            line,
                            Some(&key),
                            format!("more than {MAX_SETTINGS} settings"),
                        ));
                    }
                    self.skip_blanks();
                    match self.peek() {
                        Some(b'=') => self.pos += 1,
                        Some(b'+') if self.peek_at(1) == Some(b'=') => {
                            return Err(ParseError::new(
                                line,
                                Some(&key),
                                "`+=` is not supported; give the whole value with `=`",
                            ));
                        }
                        None | Some(b'\n' | b';' | b'#') => {
                            return Err(ParseError::new(
                                line,
                                Some(&key),
                                "missing `=` and value after the key",
                            ));
                        }
                        Some(_) => {
                            return Err(ParseError::new(
                                line,
                                Some(&key),
                                format!("missing `=` after the key (found `{}`)", self.near()),
                            ));
                        }
                    }
                    self.skip_blanks();
                    let value = self.value(&key, 0, None)?;
                    self.skip_blanks();
                    if !matches!(self.peek(), None | Some(b'\n' | b';' | b'#')) {
                        return Err(ParseError::new(
                            self.line,
                            Some(&key),
                            format!(
                                "unexpected `{}` after the value (settings are separated by \
                                 newlines or `;`)",
                                self.near()
                            ),
                        ));
                    }
                    first_line.insert(key.clone(), line);
                    settings.push(Setting { key, line, value });
                }
                Some(_) => {
                    return Err(ParseError::new(
                        self.line,
                        None,
                        format!("expected a setting `KEY = VALUE`, found `{}`", self.near()),
                    ));
                }
            }
        }
    }

    fn key(&mut self) -> Result<String, ParseError> {
        let start = self.pos;
        while matches!(self.peek(), Some(b) if b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        {
            self.pos += 1;
        }
        let key = self.slice(start, self.pos);
        if key.len() > MAX_KEY_LEN {
            return Err(ParseError::new(
                self.line,
                None,
                format!(
                    "key `{}` is longer than {MAX_KEY_LEN} characters",
                    show(key, 40)
                ),
            ));
        }
        Ok(key.to_string())
    }

    /// A value; `depth` is the number of enclosing lists, `list_line` where the innermost opened.
    fn value(
        &mut self,
        key: &str,
        depth: usize,
        list_line: Option<usize>,
    ) -> Result<Node, ParseError> {
        let line = self.line;
        let kind = match self.peek() {
            Some(quote @ (b'"' | b'\'')) => NodeKind::Str(self.string(key, quote)?),
            Some(b'[') => NodeKind::List(self.list(key, depth + 1)?),
            Some(b'-' | b'0'..=b'9') => NodeKind::Int(self.number(key)?),
            None | Some(b'\n' | b';' | b'#') if list_line.is_none() => {
                return Err(ParseError::new(line, Some(key), "missing value after `=`"));
            }
            Some(b) => {
                let hint = match list_line {
                    Some(open) if b.is_ascii_alphabetic() => {
                        format!(" (is the `[` on line {open} missing its `]`?)")
                    }
                    None if b.is_ascii_alphabetic() => {
                        " (strings must be quoted: `key = \"word\"`)".to_string()
                    }
                    _ => String::new(),
                };
                return Err(ParseError::new(
                    line,
                    Some(key),
                    format!(
                        "expected a value (a quoted string, a number or a list), found `{}`{hint}",
                        self.near()
                    ),
                ));
            }
            None => {
                return Err(ParseError::new(line, Some(key), "missing value"));
            }
        };
        Ok(Node { line, kind })
    }

    fn string(&mut self, key: &str, quote: u8) -> Result<String, ParseError> {
        let line = self.line;
        let unterminated = || {
            ParseError::new(
                line,
                Some(key),
                format!(
                    "unterminated string: no closing {} on this line (a string ends on the \
                     line it starts)",
                    if quote == b'"' { "`\"`" } else { "`'`" }
                ),
            )
        };
        self.pos += 1;
        let mut out = String::new();
        let mut segment = self.pos;
        loop {
            match self.peek() {
                None | Some(b'\n') => return Err(unterminated()),
                Some(b) if b == quote => {
                    out.push_str(self.slice(segment, self.pos));
                    self.pos += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    out.push_str(self.slice(segment, self.pos));
                    self.pos += 1;
                    let escaped = match self.peek() {
                        None | Some(b'\n') => return Err(unterminated()),
                        Some(b'"') => '"',
                        Some(b'\'') => '\'',
                        Some(b'\\') => '\\',
                        Some(b'a') => '\x07',
                        Some(b'b') => '\x08',
                        Some(b'f') => '\x0c',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'v') => '\x0b',
                        Some(b'x') => {
                            let hex = self.slice(self.pos + 1, self.pos + 3);
                            let code = (hex.len() == 2
                                && hex.bytes().all(|h| h.is_ascii_hexdigit()))
                            .then(|| u8::from_str_radix(hex, 16).ok())
                            .flatten()
                            .filter(u8::is_ascii);
                            match code {
                                Some(code) => {
                                    self.pos += 2;
                                    char::from(code)
                                }
                                None => {
                                    return Err(ParseError::new(
                                        self.line,
                                        Some(key),
                                        "bad `\\x` escape: it takes two hex digits of an ASCII \
                                         character (00 to 7f)",
                                    ));
                                }
                            }
                        }
                        Some(b'0'..=b'7') => {
                            return Err(ParseError::new(
                                self.line,
                                Some(key),
                                "octal escapes are not supported in strings; use `\\xHH`",
                            ));
                        }
                        Some(_) => {
                            let c = self
                                .src
                                .get(self.pos..)
                                .and_then(|r| r.chars().next())
                                .unwrap_or('?');
                            return Err(ParseError::new(
                                self.line,
                                Some(key),
                                format!(
                                    "unknown escape `\\{}` in a string (write `\\\\` for a \
                                     backslash)",
                                    c.escape_debug()
                                ),
                            ));
                        }
                    };
                    out.push(escaped);
                    self.pos += 1;
                    segment = self.pos;
                }
                Some(_) => self.pos += 1,
            }
        }
    }

    fn number(&mut self, key: &str) -> Result<i64, ParseError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        while matches!(self.peek(), Some(b) if b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        {
            self.pos += 1;
        }
        let text = self.slice(start, self.pos);
        parse_int(text).map_err(|why| {
            ParseError::new(
                self.line,
                Some(key),
                format!("bad number `{}`{why}", show(text, 40)),
            )
        })
    }

    fn list(&mut self, key: &str, depth: usize) -> Result<Vec<Node>, ParseError> {
        let open = self.line;
        if depth > MAX_LIST_DEPTH {
            return Err(ParseError::new(
                open,
                Some(key),
                format!("lists nested more than {MAX_LIST_DEPTH} deep"),
            ));
        }
        self.pos += 1;
        let unterminated = || {
            ParseError::new(
                open,
                Some(key),
                format!("unterminated list: the `[` on line {open} has no matching `]`"),
            )
        };
        let mut items = Vec::new();
        loop {
            self.skip_list_space();
            match self.peek() {
                None => return Err(unterminated()),
                Some(b']') => {
                    self.pos += 1;
                    return Ok(items);
                }
                Some(_) => {}
            }
            if items.len() >= MAX_LIST_ITEMS {
                return Err(ParseError::new(
                    self.line,
                    Some(key),
                    format!("a list of more than {MAX_LIST_ITEMS} items"),
                ));
            }
            items.push(self.value(key, depth, Some(open))?);
            self.skip_list_space();
            match self.peek() {
                None => return Err(unterminated()),
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(items);
                }
                Some(_) => {
                    return Err(ParseError::new(
                        self.line,
                        Some(key),
                        format!(
                            "expected `,` or `]` in the list opened on line {open}, found `{}`",
                            self.near()
                        ),
                    ));
                }
            }
        }
    }
}

/// Decimal, `0x` hexadecimal, `0` octal, with an optional `-`; the error is a hint to append.
fn parse_int(text: &str) -> Result<i64, &'static str> {
    let (negative, body) = match text.strip_prefix('-') {
        Some(body) => (true, body),
        None => (false, text),
    };
    if !body.starts_with(|c: char| c.is_ascii_digit()) {
        return Err("");
    }
    let magnitude = if let Some(hex) = body.strip_prefix("0x").or_else(|| body.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("");
        }
        u64::from_str_radix(hex, 16).map_err(|_| " (out of range)")?
    } else if let Some(octal) = body.strip_prefix('0').filter(|o| !o.is_empty()) {
        if !octal.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return Err(" (a leading 0 makes it octal, as in xl)");
        }
        u64::from_str_radix(octal, 8).map_err(|_| " (out of range)")?
    } else {
        if !body.bytes().all(|b| b.is_ascii_digit()) {
            return Err("");
        }
        body.parse::<u64>().map_err(|_| " (out of range)")?
    };
    let value = if negative {
        -i128::from(magnitude)
    } else {
        i128::from(magnitude)
    };
    i64::try_from(value).map_err(|_| " (out of range)")
}

/// Builds the typed config from the settings.
fn build(settings: Vec<Setting>) -> Result<DomainConfig, ParseError> {
    let mut cfg = DomainConfig::default();
    let mut have_name = false;
    let mut maxmem_line = 0;
    for Setting { key, line, value } in settings {
        let err = |message: String| ParseError::new(line, Some(&key), message);
        match key.as_str() {
            "name" => {
                let name = want_str(&key, value)?;
                check_name(&name).map_err(err)?;
                cfg.name = name;
                have_name = true;
            }
            "uuid" => {
                let uuid = want_str(&key, value)?;
                check_uuid(&uuid).map_err(err)?;
                cfg.uuid = Some(uuid);
            }
            "memory" => {
                let mib = want_int(&key, value)?;
                cfg.memory_mib = u64::try_from(mib)
                    .ok()
                    .filter(|&m| m > 0)
                    .ok_or_else(|| err(format!("must be at least 1 (MiB), not {mib}")))?;
            }
            "maxmem" => {
                let mib = want_int(&key, value)?;
                cfg.maxmem_mib = Some(
                    u64::try_from(mib)
                        .ok()
                        .filter(|&m| m > 0)
                        .ok_or_else(|| err(format!("must be at least 1 (MiB), not {mib}")))?,
                );
                maxmem_line = line;
            }
            "vcpus" => {
                let n = want_int(&key, value)?;
                cfg.vcpus = u32::try_from(n)
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| err(format!("must be between 1 and {}, not {n}", u32::MAX)))?;
            }
            "kernel" | "ramdisk" => {
                let path = want_str(&key, value)?;
                check_path(&path).map_err(err)?;
                let slot = if key == "kernel" {
                    &mut cfg.kernel
                } else {
                    &mut cfg.ramdisk
                };
                *slot = Some(PathBuf::from(path));
            }
            "extra" => cfg.extra = Some(want_str(&key, value)?),
            "root" => cfg.root = Some(want_str(&key, value)?),
            "serial" => {
                let serial = match value.kind {
                    NodeKind::List(items) => match items.into_iter().next() {
                        Some(first) => Some(want_str(&key, first)?),
                        None => None,
                    },
                    _ => Some(want_str(&key, value)?),
                };
                if let Some(serial) = &serial
                    && serial.contains('\0')
                {
                    return Err(err("a NUL character in the serial device".into()));
                }
                cfg.serial = serial;
            }
            "vif" => {
                cfg.vifs = want_list(&key, value)?
                    .into_iter()
                    .map(|item| want_str(&key, item))
                    .collect::<Result<_, _>>()?;
            }
            "disk" => {
                let mut first_use: HashMap<String, usize> = HashMap::new();
                for (index, item) in want_list(&key, value)?.into_iter().enumerate() {
                    let item_line = item.line;
                    let spec = want_str(&key, item).map_err(|mut e| {
                        e.message = format!("disk[{index}]: {}", e.message);
                        e
                    })?;
                    let disk = parse_disk_spec(&spec).map_err(|why| {
                        ParseError::new(
                            item_line,
                            Some(&key),
                            format!("disk[{index}] `{}`: {why}", show(&spec, 60)),
                        )
                    })?;
                    if let Some(first) = first_use.insert(disk.vdev.clone(), index) {
                        return Err(ParseError::new(
                            item_line,
                            Some(&key),
                            format!(
                                "disk[{index}]: vdev `{}` is already used by disk[{first}]",
                                disk.vdev
                            ),
                        ));
                    }
                    cfg.disks.push(disk);
                }
            }
            _ => cfg.other.push((key, value.into_value())),
        }
    }
    if !have_name {
        return Err(ParseError::new(
            0,
            Some("name"),
            "missing: a domain needs `name = \"...\"`",
        ));
    }
    if let Some(maxmem) = cfg.maxmem_mib
        && maxmem < cfg.memory_mib
    {
        return Err(ParseError::new(
            maxmem_line,
            Some("maxmem"),
            format!(
                "maxmem ({maxmem} MiB) is below memory ({} MiB)",
                cfg.memory_mib
            ),
        ));
    }
    Ok(cfg)
}

fn want_str(key: &str, node: Node) -> Result<String, ParseError> {
    match node.kind {
        NodeKind::Str(s) => Ok(s),
        _ => Err(ParseError::new(
            node.line,
            Some(key),
            format!("expected a string, found {}", node.describe()),
        )),
    }
}

fn want_int(key: &str, node: Node) -> Result<i64, ParseError> {
    match &node.kind {
        NodeKind::Int(i) => Ok(*i),
        NodeKind::Str(s) if parse_int(s.trim()).is_ok() => Err(ParseError::new(
            node.line,
            Some(key),
            format!(
                "expected an integer, found the string \"{}\" (xl takes integers only: write \
                 `{key} = {}` without quotes)",
                show(s, 20),
                s.trim()
            ),
        )),
        _ => Err(ParseError::new(
            node.line,
            Some(key),
            format!("expected an integer, found {}", node.describe()),
        )),
    }
}

fn want_list(key: &str, node: Node) -> Result<Vec<Node>, ParseError> {
    match node.kind {
        NodeKind::List(items) => Ok(items),
        _ => Err(ParseError::new(
            node.line,
            Some(key),
            format!(
                "expected a list `[ '...', ... ]`, found {}",
                node.describe()
            ),
        )),
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the domain name is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "the domain name is longer than {MAX_NAME_LEN} characters"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "the domain name `{}` has the character {:?}; use only letters, digits, `_`, `.` and \
             `-` (it is used in file names)",
            show(name, 40),
            bad
        ));
    }
    if name == "." || name == ".." {
        return Err(format!(
            "`{name}` cannot be a domain name (it is used in file names)"
        ));
    }
    Ok(())
}

fn check_uuid(uuid: &str) -> Result<(), String> {
    let groups: Vec<&str> = uuid.split('-').collect();
    let lengths: Vec<usize> = groups.iter().map(|g| g.len()).collect();
    if lengths == [8, 4, 4, 4, 12]
        && groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a UUID (XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX, hex digits)",
            show(uuid, 40)
        ))
    }
}

fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        Err("the path is empty".into())
    } else if path.contains('\0') {
        Err("a NUL character in the path".into())
    } else {
        Ok(())
    }
}

fn is_key(key: &str) -> bool {
    key.len() <= MAX_KEY_LEN
        && key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
}

/// `text` cut to `max` characters with control characters escaped: safe in a one-line message.
fn show(text: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in text.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Rendering

/// A double-quoted string that the lexer reads back as `s` (and xl too, unless `s` holds ASCII
/// control characters other than `\a \b \t \n \v \f \r`).
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\x07' => out.push_str("\\a"),
            '\x08' => out.push_str("\\b"),
            '\x0b' => out.push_str("\\v"),
            '\x0c' => out.push_str("\\f"),
            c if c.is_ascii_control() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn render_value(value: &Value) -> String {
    match value {
        Value::Str(s) => quote(s),
        Value::Int(i) => i.to_string(),
        Value::List(items) if items.is_empty() => "[]".to_string(),
        Value::List(items) => {
            let items: Vec<String> = items.iter().map(render_value).collect();
            format!("[ {} ]", items.join(", "))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Disk specs

/// What a legacy `word:` prefix on a target means.
enum Prefix {
    Format(DiskFormat),
    Script(&'static str),
    Phy,
    Ignored,
}

/// A parameter that may be given once, positionally (possibly empty, which only fills the
/// position) or by name.
#[derive(Default)]
struct Slot {
    filled: bool,
    value: Option<String>,
}

impl Slot {
    fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        if !value.is_empty() {
            if let Some(old) = &self.value {
                return Err(format!(
                    "`{name}` given twice (`{}` and `{}`)",
                    show(old, 40),
                    show(value, 40)
                ));
            }
            self.value = Some(value.to_string());
        }
        self.filled = true;
        Ok(())
    }
}

#[derive(Default)]
struct DiskParser {
    target: Slot,
    format: Slot,
    vdev: Slot,
    access: Slot,
    backendtype: Option<String>,
    devtype: Option<String>,
    devtype_named: bool,
    prefix_format: Option<DiskFormat>,
    prefix_phy: bool,
    had_prefix: bool,
    /// Parameters kept only in the spec, as written (trimmed).
    extras: Vec<String>,
    /// Names of those, for the duplicate check.
    extra_names: Vec<&'static str>,
}

/// Parses a disk spec; also returns the parameters only `spec` keeps.
fn parse_disk(spec: &str) -> Result<(DiskSpec, Vec<String>), String> {
    if spec.len() > MAX_DISK_SPEC_LEN {
        return Err(format!(
            "the disk spec is longer than {MAX_DISK_SPEC_LEN} bytes"
        ));
    }
    if let Some(c) = spec.chars().find(|&c| c.is_control() && c != '\t') {
        return Err(format!("control character {:?} in the disk spec", c));
    }
    let mut parser = DiskParser::default();
    let mut rest = spec;
    loop {
        rest = rest.trim_start_matches([' ', '\t']);
        if rest.is_empty() {
            break;
        }
        if let Some(target) = rest.strip_prefix("target=") {
            let target = target.strip_suffix(',').unwrap_or(target);
            parser.target.set("target", target)?;
            break;
        }
        let (token, after) = rest.split_once(',').unwrap_or((rest, ""));
        rest = after;
        parser.token(token)?;
    }
    parser.finish(spec)
}

impl DiskParser {
    fn token(&mut self, token: &str) -> Result<(), String> {
        let trimmed = token.trim_end_matches([' ', '\t']);
        if let Some((key, value)) = trimmed.split_once('=') {
            return match key {
                "format" => self.format_param(value),
                "vdev" => self.vdev.set("vdev", value),
                "access" => self.access_param(value),
                "backendtype" => {
                    if !matches!(value, "phy" | "qdisk" | "tap" | "standalone") {
                        return Err(format!(
                            "unknown backendtype `{}` (phy, qdisk or tap)",
                            show(value, 40)
                        ));
                    }
                    if self.backendtype.is_some() {
                        return Err("`backendtype` given twice".into());
                    }
                    self.backendtype = Some(value.to_string());
                    Ok(())
                }
                "devtype" => {
                    if self.devtype_named {
                        return Err("`devtype` given twice".into());
                    }
                    self.devtype_named = true;
                    self.set_devtype(value)
                }
                "backend" => self.extra("backend", trimmed),
                "script" => self.extra("script", trimmed),
                "colo-host" => self.extra("colo-host", trimmed),
                "colo-export" => self.extra("colo-export", trimmed),
                "active-disk" => self.extra("active-disk", trimmed),
                "hidden-disk" => self.extra("hidden-disk", trimmed),
                "specification" => {
                    if !matches!(value, "xen" | "virtio") {
                        return Err(format!(
                            "unknown specification `{}` (xen or virtio)",
                            show(value, 40)
                        ));
                    }
                    self.extra("specification", trimmed)
                }
                "colo-port" => {
                    if !value.parse::<u16>().is_ok_and(|p| p > 0) {
                        return Err(format!("bad colo-port `{}`", show(value, 40)));
                    }
                    self.extra("colo-port", trimmed)
                }
                "grant_usage" => {
                    if !matches!(value, "0" | "1") {
                        return Err(format!("bad grant_usage `{}` (0 or 1)", show(value, 40)));
                    }
                    self.extra("grant_usage", trimmed)
                }
                _ if is_param_name(key) => Err(format!("unknown parameter `{}`", show(key, 40))),
                _ => Err(format!(
                    "bad disk syntax near `{}` (a target with `=` must be given as the last \
                     parameter, `target=...`)",
                    show(trimmed, 40)
                )),
            };
        }
        match trimmed {
            "cdrom" => self.set_devtype("cdrom"),
            "direct-io-safe" => self.extra("direct-io-safe", trimmed),
            "discard" | "no-discard" => self.extra("discard", trimmed),
            "colo" | "no-colo" => self.extra("colo", trimmed),
            "trusted" | "untrusted" => self.extra("trusted", trimmed),
            _ => self.positional(token),
        }
    }

    fn positional(&mut self, token: &str) -> Result<(), String> {
        if !self.target.filled {
            let mut target = token;
            while let Some((prefix, rest)) = legacy_prefix(target)? {
                self.had_prefix = true;
                match prefix {
                    Prefix::Format(format) => {
                        if self.prefix_format.is_some_and(|f| f != format) {
                            return Err("two different legacy format prefixes".into());
                        }
                        self.prefix_format = Some(format);
                    }
                    Prefix::Script(name) => {
                        self.extra("script", &format!("script=block-{name}"))?;
                    }
                    Prefix::Phy => self.prefix_phy = true,
                    Prefix::Ignored => {}
                }
                target = rest;
            }
            return self.target.set("target", target);
        }
        let token = token.trim_end_matches([' ', '\t']);
        if !self.had_prefix && !self.format.filled {
            if self.target.value.is_none() && token.contains(':') {
                // xend's empty cdrom: `,hdc:cdrom,r`
                self.format.filled = true;
                return self.vdev_and_devtype(token);
            }
            return self.format_param(token);
        }
        if !self.vdev.filled {
            if token.contains(':') {
                return self.vdev_and_devtype(token);
            }
            return self.vdev.set("vdev", token);
        }
        if !self.access.filled {
            return self.access_param(token);
        }
        Err(format!(
            "too many positional parameters at `{}` (at most four: target, format, vdev, access)",
            show(token, 40)
        ))
    }

    fn format_param(&mut self, value: &str) -> Result<(), String> {
        if !value.is_empty() && DiskFormat::from_name(value).is_none() {
            return Err(format!(
                "unknown format `{}` (raw, qcow, qcow2, vhd, qed or empty)",
                show(value, 40)
            ));
        }
        self.format.set("format", value)
    }

    fn access_param(&mut self, value: &str) -> Result<(), String> {
        if !matches!(value, "" | "r" | "ro" | "w" | "rw") {
            return Err(format!("unknown access `{}` (rw or ro)", show(value, 40)));
        }
        self.access.set("access", value)
    }

    /// A legacy `vdev:devtype` positional.
    fn vdev_and_devtype(&mut self, token: &str) -> Result<(), String> {
        let (vdev, devtype) = token.rsplit_once(':').unwrap_or((token, ""));
        self.vdev.set("vdev", vdev)?;
        self.set_devtype(devtype)
    }

    fn set_devtype(&mut self, devtype: &str) -> Result<(), String> {
        if !matches!(devtype, "cdrom" | "disk") {
            return Err(format!(
                "unknown device type `{}` (cdrom or disk)",
                show(devtype, 40)
            ));
        }
        match &self.devtype {
            Some(old) if old != devtype => {
                Err(format!("conflicting device types `{old}` and `{devtype}`"))
            }
            _ => {
                self.devtype = Some(devtype.to_string());
                Ok(())
            }
        }
    }

    fn extra(&mut self, name: &'static str, text: &str) -> Result<(), String> {
        if self.extra_names.contains(&name) {
            return Err(format!("`{name}` given twice"));
        }
        self.extra_names.push(name);
        self.extras.push(text.to_string());
        Ok(())
    }

    fn finish(self, spec: &str) -> Result<(DiskSpec, Vec<String>), String> {
        let Some(vdev) = self.vdev.value else {
            return Err("no vdev (the device the guest sees, e.g. `xvda`)".into());
        };
        if vdev.len() > MAX_VDEV_LEN || !vdev.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(format!(
                "bad vdev `{}` (letters and digits, like xvda, hdc, sdb)",
                show(&vdev, 40)
            ));
        }
        let cdrom = self.devtype.as_deref() == Some("cdrom");
        let mut format = match self.format.value.as_deref() {
            Some(name) => DiskFormat::from_name(name).unwrap_or(DiskFormat::Raw),
            None => self.prefix_format.unwrap_or(DiskFormat::Raw),
        };
        let target = self.target.value.unwrap_or_default();
        if target.is_empty() {
            if !cdrom {
                return Err("no target (only an empty cdrom drive may have none)".into());
            }
            format = DiskFormat::Empty;
        } else if format == DiskFormat::Empty {
            return Err("format `empty` is only for an empty cdrom drive (no target)".into());
        }
        let access = match self.access.value.as_deref() {
            _ if cdrom => DiskAccess::ReadOnly,
            Some("r" | "ro") => DiskAccess::ReadOnly,
            _ => DiskAccess::ReadWrite,
        };
        let backendtype = self
            .backendtype
            .or_else(|| self.prefix_phy.then(|| "phy".to_string()));
        Ok((
            DiskSpec {
                target,
                format,
                vdev,
                access,
                backendtype,
                devtype: self.devtype,
                spec: spec.to_string(),
            },
            self.extras,
        ))
    }
}

/// `[a-z][-a-z0-9_]*`: what xl takes for a parameter name.
fn is_param_name(key: &str) -> bool {
    key.starts_with(|c: char| c.is_ascii_lowercase())
        && key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// A legacy `word:` prefix at the start of a target, and the rest. `rbd:pool/image` has none (a
/// prefix is followed by something other than a letter or digit, or by nothing, unless it is one
/// xl knows); an unknown one (`foo:/x`) is an error, as in xl.
fn legacy_prefix(target: &str) -> Result<Option<(Prefix, &str)>, String> {
    let word_len = target
        .bytes()
        .take_while(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        .count();
    if word_len == 0 || !target.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Ok(None);
    }
    let (Some(word), Some(rest)) = (target.get(..word_len), target.get(word_len..)) else {
        return Ok(None);
    };
    let Some(rest) = rest.strip_prefix(':') else {
        return Ok(None);
    };
    let prefix = match word {
        "raw" => Prefix::Format(DiskFormat::Raw),
        "qcow" => Prefix::Format(DiskFormat::Qcow),
        "qcow2" => Prefix::Format(DiskFormat::Qcow2),
        "vhd" => Prefix::Format(DiskFormat::Vhd),
        "iscsi" => Prefix::Script("iscsi"),
        "nbd" => Prefix::Script("nbd"),
        "enbd" => Prefix::Script("enbd"),
        "drbd" => Prefix::Script("drbd"),
        "phy" => Prefix::Phy,
        "tapdisk" | "tap" | "tap2" | "aio" | "ioemu" | "file" => Prefix::Ignored,
        _ if rest.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit()) => {
            return Ok(None);
        }
        _ => {
            return Err(format!(
                "unknown legacy disk prefix `{word}:` (give the target as `target=...` if it \
                 really starts so)"
            ));
        }
    };
    Ok(Some((prefix, rest)))
}

/// `rbd:...`, `nbd:...`, `iscsi:...`: a target that names something other than a file.
fn has_protocol_prefix(target: &str) -> bool {
    match target.split_once(':') {
        Some((scheme, _)) => {
            scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'.' | b'-'))
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HVM_EXAMPLE: &str = r#"# =====================================================================
# Example HVM guest configuration
# =====================================================================
#
# This is a fairly minimal example of what is required for an
# HVM guest. For a more complete guide see xl.cfg(5)

# This configures an HVM rather than PV guest
type = "hvm"

# Guest name
name = "example.hvm"

# 128-bit UUID for the domain as a hexadecimal number.
# Use "uuidgen" to generate one if required.
# The default behavior is to generate a new UUID each time the guest is started.
#uuid = "XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX"

# Enable Microsoft Hyper-V compatibile paravirtualisation /
# enlightenment interfaces. Turning this on can improve Windows guest
# performance and is therefore recommended
#viridian = 1

# Initial memory allocation (MB)
memory = 128

# Maximum memory (MB)
# If this is greater than `memory' then the slack will start ballooned
# (this assumes guest kernel support for ballooning)
#maxmem = 512

# Number of VCPUS
vcpus = 2

# Network devices
# A list of 'vifspec' entries as described in
# docs/misc/xl-network-configuration.markdown
vif = [ '' ]

# Disk Devices
# A list of `diskspec' entries as described in
# docs/misc/xl-disk-configuration.txt
disk = [ '/dev/vg/guest-volume,raw,xvda,rw' ]

# Guest VGA console configuration, either SDL or VNC
sdl = 1
#vnc = 1
"#;

    const PV_EXAMPLE: &str = r#"# =====================================================================
# Example PV Linux guest configuration
# =====================================================================

# Guest name
name = "example.pvlinux"

# Kernel image to boot
kernel = "/boot/vmlinuz"

# Ramdisk (optional)
ramdisk = "/boot/initrd.gz"

# Kernel command line options
extra = "root=/dev/xvda1"

# Initial memory allocation (MB)
memory = 128

# Maximum memory (MB)
maxmem = 512

# Number of VCPUS
vcpus = 2

# Network devices
vif = [ '' ]

# Disk Devices
disk = [ '/dev/vg/guest-volume,raw,xvda,rw' ]
"#;

    fn err(text: &str) -> ParseError {
        match parse(text) {
            Ok(cfg) => panic!("expected an error for {text:?}, parsed {cfg:?}"),
            Err(e) => e,
        }
    }

    fn assert_err(text: &str, line: usize, key: Option<&str>, needle: &str) {
        let e = err(text);
        assert_eq!(e.line, line, "line of {e} for {text:?}");
        assert_eq!(e.key.as_deref(), key, "key of {e} for {text:?}");
        assert!(
            e.message.contains(needle),
            "message `{}` lacks `{needle}` for {text:?}",
            e.message
        );
    }

    fn disk(spec: &str) -> DiskSpec {
        parse_disk_spec(spec).unwrap_or_else(|e| panic!("{spec:?}: {e}"))
    }

    fn disk_err(spec: &str) -> String {
        match parse_disk_spec(spec) {
            Ok(d) => panic!("expected an error for {spec:?}, got {d:?}"),
            Err(e) => e,
        }
    }

    type Fields = (
        String,
        DiskFormat,
        String,
        DiskAccess,
        Option<String>,
        Option<String>,
    );

    /// The fields apart from `spec`.
    fn fields(d: &DiskSpec) -> Fields {
        (
            d.target.clone(),
            d.format,
            d.vdev.clone(),
            d.access,
            d.backendtype.clone(),
            d.devtype.clone(),
        )
    }

    fn assert_round_trip(cfg: &DomainConfig) {
        let text = cfg.to_xl();
        let back = parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(&back, cfg, "{text}");
    }

    #[test]
    fn hvm_example() {
        let cfg = parse(HVM_EXAMPLE).unwrap();
        assert_eq!(cfg.name, "example.hvm");
        assert_eq!(cfg.uuid, None);
        assert_eq!(cfg.memory_mib, 128);
        assert_eq!(cfg.maxmem_mib, None);
        assert_eq!(cfg.vcpus, 2);
        assert_eq!(cfg.vifs, vec![String::new()]);
        assert_eq!(cfg.disks.len(), 1);
        let d = &cfg.disks[0];
        assert_eq!(d.target, "/dev/vg/guest-volume");
        assert_eq!(d.format, DiskFormat::Raw);
        assert_eq!(d.vdev, "xvda");
        assert_eq!(d.access, DiskAccess::ReadWrite);
        assert_eq!(d.spec, "/dev/vg/guest-volume,raw,xvda,rw");
        assert_eq!(
            cfg.other,
            vec![
                ("type".to_string(), Value::Str("hvm".into())),
                ("sdl".to_string(), Value::Int(1)),
            ]
        );
        assert_eq!(cfg.disk("xvda"), Some(d));
        assert_eq!(cfg.disk("xvdb"), None);
        assert_round_trip(&cfg);
    }

    #[test]
    fn pv_example() {
        let cfg = parse(PV_EXAMPLE).unwrap();
        assert_eq!(cfg.name, "example.pvlinux");
        assert_eq!(cfg.kernel.as_deref(), Some(Path::new("/boot/vmlinuz")));
        assert_eq!(cfg.ramdisk.as_deref(), Some(Path::new("/boot/initrd.gz")));
        assert_eq!(cfg.extra.as_deref(), Some("root=/dev/xvda1"));
        assert_eq!(cfg.maxmem_mib, Some(512));
        assert_eq!(cfg.vcpus, 2);
        assert!(cfg.other.is_empty());
        assert_round_trip(&cfg);
    }

    #[test]
    fn semicolons_comments_lists_numbers_escapes() {
        let text = "name=\"h0\"; builder=\"hvm\";memory = 0x200 # hex\n\
                    vcpus = 04\n\
                    root = '/dev/xvda1 ro'\n\
                    extra = \"console=hvc0 \\\"quoted\\\" tab\\there\\\\ \\x41\"\n\
                    serial = [ 'file:/var/log/h0.log', 'pty' ]\n\
                    cpus = [\n  # pinned\n  \"0-3\",\n  \"4\" ,  # trailing comma next\n]\n\
                    pci = []\n\
                    nested = [ 1, [ 2, [ 'three' ] ], -4 ]\n\
                    on_crash = 'preserve' ; localtime = 1\r\n";
        let cfg = parse(text).unwrap();
        assert_eq!(cfg.name, "h0");
        assert_eq!(cfg.memory_mib, 512);
        assert_eq!(cfg.vcpus, 4);
        assert_eq!(cfg.root.as_deref(), Some("/dev/xvda1 ro"));
        assert_eq!(
            cfg.extra.as_deref(),
            Some("console=hvc0 \"quoted\" tab\there\\ A")
        );
        assert_eq!(cfg.serial.as_deref(), Some("file:/var/log/h0.log"));
        assert_eq!(cfg.serial_file(), Some(PathBuf::from("/var/log/h0.log")));
        let other: HashMap<_, _> = cfg.other.iter().cloned().collect();
        assert_eq!(other["builder"], Value::Str("hvm".into()));
        assert_eq!(
            other["cpus"],
            Value::List(vec![Value::Str("0-3".into()), Value::Str("4".into())])
        );
        assert_eq!(other["pci"], Value::List(vec![]));
        assert_eq!(
            other["nested"],
            Value::List(vec![
                Value::Int(1),
                Value::List(vec![
                    Value::Int(2),
                    Value::List(vec![Value::Str("three".into())])
                ]),
                Value::Int(-4),
            ])
        );
        let keys: Vec<&str> = cfg.other.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["builder", "cpus", "pci", "nested", "on_crash", "localtime"]
        );
        assert_round_trip(&cfg);
    }

    #[test]
    fn defaults_and_no_trailing_newline() {
        let cfg = parse("name = 'a'").unwrap();
        assert_eq!(cfg.memory_mib, 128);
        assert_eq!(cfg.vcpus, 1);
        assert!(cfg.disks.is_empty() && cfg.vifs.is_empty() && cfg.other.is_empty());
        assert_eq!(cfg.serial_file(), None);
        let cfg = parse("name = 'a'\nserial = []\n# end").unwrap();
        assert_eq!(cfg.serial, None);
        let cfg = parse("name = 'a'\nserial = 'pty'").unwrap();
        assert_eq!(cfg.serial_file(), None);
    }

    #[test]
    fn disk_doc_examples_are_equivalent() {
        let forms = [
            "/dev/vg/guest-volume,,hda",
            "/dev/vg/guest-volume,raw,hda,rw",
            "format=raw, vdev=hda, access=rw, target=/dev/vg/guest-volume",
            "raw:/dev/vg/guest-volume,hda,w",
        ];
        let want = (
            "/dev/vg/guest-volume".to_string(),
            DiskFormat::Raw,
            "hda".to_string(),
            DiskAccess::ReadWrite,
            None,
            None,
        );
        for form in forms {
            let d = disk(form);
            assert_eq!(fields(&d), want, "{form}");
            assert_eq!(d.spec, form);
        }
        let cdroms = [
            "/root/image.iso,,hdc,cdrom",
            "/root/image.iso,,hdc,,cdrom",
            "/root/image.iso,raw,hdc,devtype=cdrom",
            "format=raw, vdev=hdc, access=ro, devtype=cdrom, target=/root/image.iso",
            "raw:/root/image.iso,hdc:cdrom,ro",
        ];
        let want = (
            "/root/image.iso".to_string(),
            DiskFormat::Raw,
            "hdc".to_string(),
            DiskAccess::ReadOnly,
            None,
            Some("cdrom".to_string()),
        );
        for form in cdroms {
            assert_eq!(fields(&disk(form)), want, "{form}");
        }
        let cfg =
            parse("name='d'\ndisk = [ '/dev/vg/guest-volume,,hda', '/root/image.iso,,hdc,cdrom' ]")
                .unwrap();
        assert_eq!(cfg.disks.len(), 2);
        assert_eq!(cfg.disk("hdc").unwrap().access, DiskAccess::ReadOnly);
    }

    #[test]
    fn disk_target_keyed_takes_the_rest() {
        let d = disk("vdev=xvdb, format=qcow2, target=/images/a,b=c.qcow2");
        assert_eq!(d.target, "/images/a,b=c.qcow2");
        assert_eq!(d.format, DiskFormat::Qcow2);
        let d = disk("format=raw,vdev=xvdc,target=rbd:pool/img:conf=/etc/ceph/ceph.conf,");
        assert_eq!(d.target, "rbd:pool/img:conf=/etc/ceph/ceph.conf");
        // An empty positional target may be given again by name.
        let d = disk(",,xvdd,,target=/x,y");
        assert_eq!((d.target.as_str(), d.vdev.as_str()), ("/x,y", "xvdd"));
        assert!(disk_err("/a,raw,xvda,target=/b").contains("`target` given twice"));
        // Positional rbd target (no `=` in it).
        let d = disk("rbd:pool/image,raw,xvde");
        assert_eq!(d.target, "rbd:pool/image");
    }

    #[test]
    fn disk_empty_cdrom() {
        for spec in [
            ",hdc:cdrom,r",
            ",,hdc,,cdrom",
            "vdev=hdc,devtype=cdrom,target=",
            "format=raw,vdev=hdc,access=rw,devtype=cdrom",
        ] {
            let d = disk(spec);
            assert_eq!(d.target, "", "{spec}");
            assert_eq!(d.format, DiskFormat::Empty, "{spec}");
            assert_eq!(d.access, DiskAccess::ReadOnly, "{spec}");
            assert_eq!(d.devtype.as_deref(), Some("cdrom"), "{spec}");
            assert_eq!(
                d.to_spec(),
                "format=empty,vdev=hdc,access=ro,devtype=cdrom,target="
            );
        }
        assert!(disk_err(",,hda").contains("no target"));
        assert!(disk_err("/x,empty,hda").contains("only for an empty cdrom"));
    }

    #[test]
    fn disk_legacy_prefixes() {
        let d = disk("phy:/dev/vg/lv,xvda,w");
        assert_eq!(d.target, "/dev/vg/lv");
        assert_eq!(d.backendtype.as_deref(), Some("phy"));
        assert_eq!(d.format, DiskFormat::Raw);
        let d = disk("file:/srv/img.raw,hda,w");
        assert_eq!(
            (d.target.as_str(), d.backendtype.as_deref()),
            ("/srv/img.raw", None)
        );
        let d = disk("tap:aio:/srv/img.raw,xvda,w");
        assert_eq!(
            (d.target.as_str(), d.format),
            ("/srv/img.raw", DiskFormat::Raw)
        );
        let d = disk("tap:qcow2:/srv/img.qcow2,xvda,w");
        assert_eq!(
            (d.target.as_str(), d.format),
            ("/srv/img.qcow2", DiskFormat::Qcow2)
        );
        let d = disk("aio:/srv/x,hda,r");
        assert_eq!(
            (d.target.as_str(), d.access),
            ("/srv/x", DiskAccess::ReadOnly)
        );
        let d = disk("qcow2:/srv/x.qcow2,xvda,w");
        assert_eq!(d.format, DiskFormat::Qcow2);
        let d = disk("vhd:/srv/x.vhd,xvda");
        assert_eq!(
            (d.format, d.access),
            (DiskFormat::Vhd, DiskAccess::ReadWrite)
        );
        let d = disk("tap2:tapdisk:ioemu:qcow:/srv/x.qcow,xvda,w");
        assert_eq!(
            (d.target.as_str(), d.format),
            ("/srv/x.qcow", DiskFormat::Qcow)
        );
        // format= wins over a prefix
        let d = disk("tap:qcow2:/srv/x.vhd,xvda,w,format=vhd");
        assert_eq!(d.format, DiskFormat::Vhd);
        // a script prefix becomes script=, kept through to_spec
        let d = disk("drbd:resource0,xvda,w");
        assert_eq!(d.target, "resource0");
        assert_eq!(
            d.to_spec(),
            "format=raw,vdev=xvda,access=rw,script=block-drbd,target=resource0"
        );
        assert!(disk_err("foo:/srv/x,xvda").contains("unknown legacy disk prefix `foo:`"));
        // after a prefix the format is not positional: `raw` here is the vdev
        assert!(disk_err("raw:/x,raw,xvda").contains("unknown access `xvda`"));
        assert!(disk_err("raw:/x,xvda,w,extra").contains("too many positional"));
    }

    #[test]
    fn disk_other_params_kept_in_spec() {
        let spec = "backend=driverdom, script=block-iscsi, discard, direct-io-safe, \
                    specification=xen, /srv/a.qcow2, qcow2, xvdb, ro, backendtype=qdisk";
        let d = disk(spec);
        assert_eq!(d.target, "/srv/a.qcow2");
        assert_eq!(d.format, DiskFormat::Qcow2);
        assert_eq!(d.access, DiskAccess::ReadOnly);
        assert_eq!(d.backendtype.as_deref(), Some("qdisk"));
        assert_eq!(d.spec, spec);
        let canonical = d.to_spec();
        assert_eq!(
            canonical,
            "format=qcow2,vdev=xvdb,access=ro,backendtype=qdisk,backend=driverdom,\
             script=block-iscsi,discard,direct-io-safe,specification=xen,target=/srv/a.qcow2"
        );
        let again = disk(&canonical);
        assert_eq!(fields(&again), fields(&d));
        assert_eq!(again.to_spec(), canonical);
        // colo and the rest
        let d = disk(
            "colo,colo-host=h,colo-port=9000,colo-export=e,active-disk=/a,hidden-disk=/h,\
                      no-discard,trusted,grant_usage=1,/x,,xvda",
        );
        assert_eq!(d.target, "/x");
    }

    #[test]
    fn disk_errors() {
        assert!(disk_err("/x,qcow3,xvda").contains("unknown format `qcow3`"));
        assert!(disk_err("/x,raw,xvda,rx").contains("unknown access `rx`"));
        assert!(disk_err("/x,raw").contains("no vdev"));
        assert!(disk_err("").contains("no vdev"));
        assert!(disk_err("/x,raw,xvda,rw,extra").contains("too many positional parameters"));
        assert!(disk_err("vdev=xvda,vdev=xvdb,target=/x").contains("`vdev` given twice"));
        assert!(disk_err("/x,raw,xvda,format=qcow2").contains("`format` given twice"));
        assert!(disk_err("/x,,xvda,discard,no-discard").contains("`discard` given twice"));
        assert!(disk_err("/x,,xvda,devtype=cdrom,devtype=cdrom").contains("`devtype` given twice"));
        assert!(disk_err("/x,,xvda,devtype=floppy").contains("unknown device type"));
        assert!(disk_err("/x,,xvda,devtype=disk,cdrom").contains("conflicting device types"));
        assert!(disk_err("/x,,xvda,backendtype=nfs").contains("unknown backendtype"));
        assert!(disk_err("/x,,xvda,frobnicate=1").contains("unknown parameter `frobnicate`"));
        assert!(disk_err("/x=y,,xvda").contains("bad disk syntax"));
        assert!(disk_err("/x,,xv da").contains("bad vdev"));
        assert!(disk_err("/x,,hdc:floppy").contains("unknown device type"));
        assert!(disk_err("/x\n,,xvda").contains("control character"));
        assert!(disk_err(&"x".repeat(MAX_DISK_SPEC_LEN + 1)).contains("longer than"));
    }

    #[test]
    fn disk_to_spec_canonical() {
        let d = disk("phy:/dev/vg/lv,xvda,w");
        assert_eq!(
            d.to_spec(),
            "format=raw,vdev=xvda,access=rw,backendtype=phy,target=/dev/vg/lv"
        );
        let d = disk("vdev=xvdb,target=/odd,name,");
        assert_eq!(d.target, "/odd,name");
        let d2 = DiskSpec {
            target: "/ends,with,".into(),
            ..d.clone()
        };
        let again = disk(&d2.to_spec());
        assert_eq!(again.target, "/ends,with,");
    }

    #[test]
    fn config_errors_have_line_and_key() {
        assert_err(
            "name = 'a'\nextra = \"abc\n",
            2,
            Some("extra"),
            "unterminated string",
        );
        assert_err("name = 'a\n", 1, Some("name"), "unterminated string");
        assert_err(
            "name = 'a'\nextra = \"abc\\",
            2,
            Some("extra"),
            "unterminated string",
        );
        assert_err(
            "name = 'a'\ndisk = [ '/x,,xvda',\n  '/y,,xvdb'\n",
            2,
            Some("disk"),
            "unterminated list",
        );
        assert_err(
            "name = 'a'\ndisk = [ '/x,,xvda',\nvcpus = 2\n",
            3,
            Some("disk"),
            "missing its `]`",
        );
        assert_err(
            "name = 'a'\nvif = [ 'a' 'b' ]",
            2,
            Some("vif"),
            "expected `,` or `]`",
        );
        assert_err(
            "name = 'a'\nmemory = 12abc\n",
            2,
            Some("memory"),
            "bad number `12abc`",
        );
        assert_err("name = 'a'\nmemory = 08\n", 2, Some("memory"), "octal");
        assert_err(
            "name = 'a'\nmemory = 99999999999999999999\n",
            2,
            Some("memory"),
            "out of range",
        );
        assert_err("name = 'a'\nmemory 512\n", 2, Some("memory"), "missing `=`");
        assert_err("name = 'a'\nmemory\n", 2, Some("memory"), "missing `=`");
        assert_err("name = 'a'\nmemory =\n", 2, Some("memory"), "missing value");
        assert_err("name = 'a'\nmemory += 5\n", 2, Some("memory"), "`+=`");
        assert_err(
            "name = 'a'\nmemory = 5\n\nmemory = 6\n",
            4,
            Some("memory"),
            "duplicate key (first set on line 2)",
        );
        assert_err(
            "name = 'a'\nmemory = \"big\"\n",
            2,
            Some("memory"),
            "expected an integer, found a string",
        );
        assert_err(
            "name = 'a'\nmemory = \"512\"\n",
            2,
            Some("memory"),
            "write `memory = 512` without quotes",
        );
        assert_err(
            "name = 5\n",
            1,
            Some("name"),
            "expected a string, found an integer",
        );
        assert_err("memory = 5\n", 0, Some("name"), "missing");
        assert_err("name = 'a/b'\n", 1, Some("name"), "'/'");
        assert_err("name = ''\n", 1, Some("name"), "empty");
        assert_err("name = '..'\n", 1, Some("name"), "cannot be a domain name");
        assert_err(
            "name = 'a'\nvcpus = 0\n",
            2,
            Some("vcpus"),
            "must be between 1",
        );
        assert_err(
            "name = 'a'\nvcpus = 4294967296\n",
            2,
            Some("vcpus"),
            "must be between 1",
        );
        assert_err("name = 'a'\nmemory = 0\n", 2, Some("memory"), "at least 1");
        assert_err("name = 'a'\nmemory = -5\n", 2, Some("memory"), "at least 1");
        assert_err(
            "name = 'a'\nmemory = 1024\nmaxmem = 512\n",
            3,
            Some("maxmem"),
            "below memory",
        );
        assert_err(
            "name = 'a'\nuuid = 'not-a-uuid'\n",
            2,
            Some("uuid"),
            "not a UUID",
        );
        assert_err("name = 'a'\nkernel = ''\n", 2, Some("kernel"), "empty");
        assert_err(
            "name = 'a'\nvif = 'bridge=br0'\n",
            2,
            Some("vif"),
            "expected a list",
        );
        assert_err(
            "name = 'a'\nvif = [ 1 ]\n",
            2,
            Some("vif"),
            "expected a string",
        );
        assert_err(
            "name = 'a'\nbuilder = hvm\n",
            2,
            Some("builder"),
            "must be quoted",
        );
        assert_err(
            "name = 'a' vcpus = 2\n",
            1,
            Some("name"),
            "unexpected `vcpus = 2`",
        );
        assert_err("name = 'a'\n= 2\n", 2, None, "expected a setting");
        assert_err(
            "name = 'a'\nx = [[[[[1]]]]]\n",
            2,
            Some("x"),
            "nested more than 4",
        );
        assert_err(
            "name = 'a'\nx = \"\\q\"\n",
            2,
            Some("x"),
            "unknown escape `\\q`",
        );
        assert_err("name = 'a'\nx = \"\\101\"\n", 2, Some("x"), "octal escapes");
        assert_err("name = 'a'\nx = \"\\xff\"\n", 2, Some("x"), "`\\x` escape");
        let long_key = format!("name = 'a'\n{} = 1\n", "k".repeat(MAX_KEY_LEN + 1));
        assert_err(&long_key, 2, None, "longer than");
    }

    #[test]
    fn disk_entry_errors_name_index_and_line() {
        let text = "name = 'a'\n\
                    disk = [\n\
                      '/x,raw,xvda,rw',\n\
                      '/y,qcow3,xvdb',\n\
                    ]\n";
        let e = err(text);
        assert_eq!((e.line, e.key.as_deref()), (4, Some("disk")));
        assert!(e.message.contains("disk[1]"), "{e}");
        assert!(e.message.contains("unknown format `qcow3`"), "{e}");
        assert!(e.message.contains("/y,qcow3,xvdb"), "{e}");
        assert_eq!(
            e.to_string(),
            "line 4: key `disk`: disk[1] `/y,qcow3,xvdb`: unknown format `qcow3` (raw, qcow, \
             qcow2, vhd, qed or empty)"
        );
        assert_err(
            "name='a'\ndisk = [ '/x,,xvda', '/y,,xvda' ]",
            2,
            Some("disk"),
            "vdev `xvda` is already used by disk[0]",
        );
        assert_err(
            "name='a'\ndisk = [ '/x,raw' ]",
            2,
            Some("disk"),
            "disk[0] `/x,raw`: no vdev",
        );
        assert_err(
            "name='a'\ndisk = [ '/x,,xvda,w,x' ]",
            2,
            Some("disk"),
            "too many positional",
        );
        assert_err(
            "name='a'\ndisk = [ 'vdev=a,vdev=b,target=/x' ]",
            2,
            Some("disk"),
            "given twice",
        );
        assert_err(
            "name='a'\ndisk = [ '/x,,xvda,rx' ]",
            2,
            Some("disk"),
            "unknown access",
        );
        assert_err(
            "name='a'\ndisk = [ [ '/x,,xvda' ] ]",
            2,
            Some("disk"),
            "disk[0]: expected a string",
        );
    }

    #[test]
    fn error_display_and_core_error() {
        let e = err("name = 'a'\nmemory = 'big'\n");
        assert_eq!(
            e.to_string(),
            "line 2: key `memory`: expected an integer, found a string"
        );
        let missing = err("vcpus = 1");
        assert_eq!(
            missing.to_string(),
            "key `name`: missing: a domain needs `name = \"...\"`"
        );
        let core: snap_core::Error = e.into();
        assert_eq!(core.kind(), snap_core::ErrorKind::InvalidInput);
        assert_eq!(
            core.to_string(),
            "xl.cfg line 2: key `memory`: expected an integer, found a string"
        );
        assert!(!core.to_string().contains('\n'));
        // user text in messages is escaped onto one line
        let e = err("name = 'a'\nx = \"a\\nb\" junk\n");
        assert!(!e.to_string().contains('\n'));
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("snapctl-xlcfg-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn parse_file_names_file_line_and_key() {
        let dir = TempDir::new("file");
        let good = dir.0.join("good.cfg");
        std::fs::write(&good, PV_EXAMPLE).unwrap();
        assert_eq!(parse_file(&good).unwrap().name, "example.pvlinux");

        let bad = dir.0.join("bad.cfg");
        std::fs::write(&bad, "name = 'x'\n\nvcpus = 0\n").unwrap();
        let e = parse_file(&bad).unwrap_err();
        assert_eq!(e.kind(), snap_core::ErrorKind::InvalidInput);
        assert_eq!(e.path(), Some(bad.as_path()));
        let text = e.to_string();
        assert!(text.starts_with(&format!("{}: ", bad.display())), "{text}");
        assert!(
            text.contains("line 3: key `vcpus`: must be between 1"),
            "{text}"
        );

        let latin1 = dir.0.join("latin1.cfg");
        std::fs::write(&latin1, b"name = 'x'\n# caf\xe9\n").unwrap();
        let text = parse_file(&latin1).unwrap_err().to_string();
        assert!(text.contains("line 2: not UTF-8"), "{text}");

        let big = dir.0.join("big.cfg");
        let mut content = String::from("name = 'x'\n");
        content.push_str(&"#".repeat(MAX_FILE_BYTES));
        std::fs::write(&big, content).unwrap();
        let e = parse_file(&big).unwrap_err();
        assert_eq!(e.kind(), snap_core::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("larger than"), "{e}");

        let e = parse_file(&dir.0).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = parse_file(&dir.0.join("missing.cfg")).unwrap_err();
        assert_eq!(e.kind(), snap_core::ErrorKind::NotFound);
    }

    #[test]
    fn text_size_is_bounded() {
        let text = "#".repeat(MAX_TEXT_BYTES + 1);
        assert_err(&text, 0, None, "refusing");
        let many: String = (0..=MAX_SETTINGS)
            .map(|i| format!("k{i} = {i}\n"))
            .collect();
        assert_err(
            &many,
            MAX_SETTINGS + 1,
            Some(&format!("k{MAX_SETTINGS}")),
            "more than",
        );
        let long_list = format!("name='a'\nx = [{}]\n", "1,".repeat(MAX_LIST_ITEMS + 1));
        assert_err(&long_list, 2, Some("x"), "more than");
    }

    #[test]
    fn resolve_relative_paths() {
        let mut cfg = parse(
            "name = 'r'\nkernel = 'vmlinuz'\nramdisk = '/boot/initrd'\n\
             serial = 'file:console.log'\n\
             disk = [ 'disk.qcow2,qcow2,xvda,w', '/abs.raw,,xvdb', 'rbd:pool/img,,xvdc',\n\
                      'phy:vg/lv,xvdd,w', 'drbd:res,xvde,w', ',hdc:cdrom,r',\n\
                      'backend=dd,sub/dir/b.img,,xvdf' ]\n",
        )
        .unwrap();
        cfg.resolve_relative(Path::new("/etc/xen/vms"));
        assert_eq!(
            cfg.kernel.as_deref(),
            Some(Path::new("/etc/xen/vms/vmlinuz"))
        );
        assert_eq!(cfg.ramdisk.as_deref(), Some(Path::new("/boot/initrd")));
        assert_eq!(cfg.serial.as_deref(), Some("file:/etc/xen/vms/console.log"));
        assert_eq!(
            cfg.serial_file(),
            Some(PathBuf::from("/etc/xen/vms/console.log"))
        );
        let targets: Vec<&str> = cfg.disks.iter().map(|d| d.target.as_str()).collect();
        assert_eq!(
            targets,
            [
                "/etc/xen/vms/disk.qcow2",
                "/abs.raw",
                "rbd:pool/img",
                "vg/lv",
                "res",
                "",
                "/etc/xen/vms/sub/dir/b.img"
            ]
        );
        assert_eq!(
            cfg.disks[0].spec,
            "format=qcow2,vdev=xvda,access=rw,target=/etc/xen/vms/disk.qcow2"
        );
        assert_eq!(cfg.disks[1].spec, "/abs.raw,,xvdb");
        assert_eq!(
            cfg.disks[6].spec,
            "format=raw,vdev=xvdf,access=rw,backend=dd,target=/etc/xen/vms/sub/dir/b.img"
        );
        assert_round_trip(&cfg);
    }

    #[test]
    fn to_xl_renders_changed_disks_canonically_and_skips_bad_other_keys() {
        let mut cfg = parse("name='a'\ndisk=['/x,,xvda']\n").unwrap();
        cfg.disks[0].target = "/y".into();
        let text = cfg.to_xl();
        assert!(
            text.contains("\"format=raw,vdev=xvda,access=rw,target=/y\""),
            "{text}"
        );
        let back = parse(&text).unwrap();
        assert_eq!(back.disks[0].target, "/y");

        let mut cfg = parse("name='a'\n").unwrap();
        cfg.other = vec![
            ("ok".into(), Value::Int(1)),
            ("memory".into(), Value::Int(5)),
            ("bad key".into(), Value::Int(2)),
            ("ok".into(), Value::Int(3)),
            ("ctl".into(), Value::Str("\u{0}\u{1}\u{7f}é\"'\\".into())),
        ];
        let back = parse(&cfg.to_xl()).unwrap();
        assert_eq!(back.memory_mib, 128);
        assert_eq!(
            back.other,
            vec![
                ("ok".to_string(), Value::Int(1)),
                (
                    "ctl".to_string(),
                    Value::Str("\u{0}\u{1}\u{7f}é\"'\\".into())
                ),
            ]
        );
    }

    #[test]
    fn serde_shapes() {
        let cfg = parse("name='a'\nx = [ 1, 'two' ]\ndisk = [ ',hdc:cdrom,r' ]\n").unwrap();
        let json = serde_json::to_value(&cfg).unwrap();
        assert_eq!(json["other"][0], serde_json::json!(["x", [1, "two"]]));
        assert_eq!(json["disks"][0]["format"], "empty");
        assert_eq!(json["disks"][0]["access"], "ro");
        let back: DomainConfig = serde_json::from_value(json).unwrap();
        assert_eq!(back, cfg);
        assert_eq!(DiskFormat::Qcow2.as_str(), "qcow2");
        assert_eq!(DiskAccess::ReadWrite.as_str(), "rw");
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_int("0"), Ok(0));
        assert_eq!(parse_int("-0"), Ok(0));
        assert_eq!(parse_int("0x1F"), Ok(31));
        assert_eq!(parse_int("010"), Ok(8));
        assert_eq!(parse_int("-9223372036854775808"), Ok(i64::MIN));
        assert!(parse_int("9223372036854775808").is_err());
        assert!(parse_int("-").is_err());
        assert!(parse_int("0x").is_err());
        assert!(parse_int("-+5").is_err());
        assert!(parse_int("1.5").is_err());
    }

    // ---- property tests ----

    fn any_text(max: usize) -> impl Strategy<Value = String> {
        proptest::collection::vec(any::<char>(), 0..max).prop_map(|v| v.into_iter().collect())
    }

    /// No NUL, not empty: a path or serial device.
    fn path_text() -> impl Strategy<Value = String> {
        any_text(12).prop_map(|s| format!("p{}", s.replace('\0', "")))
    }

    fn target_text() -> impl Strategy<Value = String> {
        any_text(16).prop_map(|s| {
            let t: String = s
                .chars()
                .filter(|c| !c.is_control() || *c == '\t')
                .collect();
            format!("/{t}")
        })
    }

    fn arb_disk(index: usize) -> impl Strategy<Value = DiskSpec> {
        let formats = prop_oneof![
            Just(DiskFormat::Raw),
            Just(DiskFormat::Qcow),
            Just(DiskFormat::Qcow2),
            Just(DiskFormat::Vhd),
            Just(DiskFormat::Qed),
        ];
        let backend = prop_oneof![
            Just(None),
            Just(Some("phy".to_string())),
            Just(Some("qdisk".to_string())),
            Just(Some("tap".to_string())),
        ];
        let devtype = prop_oneof![
            Just(None),
            Just(Some("disk".to_string())),
            Just(Some("cdrom".to_string())),
        ];
        (
            target_text(),
            any::<bool>(),
            formats,
            any::<bool>(),
            backend,
            devtype,
            "(xvd|hd|sd)",
        )
            .prop_map(
                move |(target, empty, format, ro, backendtype, devtype, stem)| {
                    let cdrom = devtype.as_deref() == Some("cdrom");
                    let empty = cdrom && empty;
                    let mut d = DiskSpec {
                        target: if empty { String::new() } else { target },
                        format: if empty { DiskFormat::Empty } else { format },
                        vdev: format!("{stem}{index}"),
                        access: if ro || cdrom {
                            DiskAccess::ReadOnly
                        } else {
                            DiskAccess::ReadWrite
                        },
                        backendtype,
                        devtype,
                        spec: String::new(),
                    };
                    d.spec = d.to_spec();
                    d
                },
            )
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            any::<i64>().prop_map(Value::Int),
            any_text(10).prop_map(Value::Str),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            proptest::collection::vec(inner, 0..4).prop_map(Value::List)
        })
    }

    prop_compose! {
        fn arb_config()(
            name in "[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}",
            uuid in proptest::option::of("[0-9a-fA-F]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9A-F]{12}"),
            memory_mib in 1u64..=(i64::MAX as u64),
            maxmem_extra in proptest::option::of(0u64..1 << 40),
            vcpus in 1u32..,
            kernel in proptest::option::of(path_text()),
            ramdisk in proptest::option::of(path_text()),
            extra in proptest::option::of(any_text(20)),
            root in proptest::option::of(any_text(8)),
            serial in proptest::option::of(path_text()),
            vifs in proptest::collection::vec(any_text(12), 0..3),
            disks in (0usize..4).prop_flat_map(|n| (0..n).map(arb_disk).collect::<Vec<_>>()),
            other in proptest::collection::vec(("[a-z_][a-z0-9_.]{0,8}", arb_value()), 0..5),
        ) -> DomainConfig {
            let mut seen = HashSet::new();
            let other = other
                .into_iter()
                .filter(|(k, _)| !TYPED_KEYS.contains(&k.as_str()) && seen.insert(k.clone()))
                .collect();
            DomainConfig {
                name,
                uuid,
                memory_mib,
                maxmem_mib: maxmem_extra
                    .map(|e| memory_mib.saturating_add(e).min(i64::MAX as u64)),
                vcpus,
                kernel: kernel.map(PathBuf::from),
                ramdisk: ramdisk.map(PathBuf::from),
                extra,
                root,
                serial,
                vifs,
                disks,
                other,
            }
        }
    }

    /// Fragments that make the parser go down its interesting paths.
    fn xl_ish() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("name".to_string()),
            Just("memory".to_string()),
            Just("disk".to_string()),
            Just("vif".to_string()),
            Just("serial".to_string()),
            Just("x".to_string()),
            Just(" = ".to_string()),
            Just("=".to_string()),
            Just("'".to_string()),
            Just("\"".to_string()),
            Just("\\".to_string()),
            Just("[".to_string()),
            Just("]".to_string()),
            Just(",".to_string()),
            Just("\n".to_string()),
            Just(";".to_string()),
            Just("#".to_string()),
            Just("0x".to_string()),
            Just("-".to_string()),
            Just("12".to_string()),
            Just("'a'".to_string()),
            Just("'/x,,xvda'".to_string()),
            Just("phy:".to_string()),
            Just("target=".to_string()),
            Just("cdrom".to_string()),
            Just(":".to_string()),
            any_text(3),
        ];
        proptest::collection::vec(piece, 0..40).prop_map(|v| v.concat())
    }

    fn check_round_trip_if_parses(text: &str) -> Result<(), TestCaseError> {
        if let Ok(cfg) = parse(text) {
            let rendered = cfg.to_xl();
            let back = parse(&rendered);
            prop_assert_eq!(back.as_ref().ok(), Some(&cfg), "{:?}\n{}", back, rendered);
        }
        if let Ok(d) = parse_disk_spec(text) {
            let canonical = d.to_spec();
            let again = parse_disk_spec(&canonical);
            prop_assert_eq!(
                again.as_ref().map(fields).ok(),
                Some(fields(&d)),
                "{}",
                canonical
            );
            prop_assert_eq!(again.map(|a| a.to_spec()).ok(), Some(canonical));
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_configs_round_trip(cfg in arb_config()) {
            let text = cfg.to_xl();
            let back = parse(&text);
            prop_assert_eq!(back.as_ref().ok(), Some(&cfg), "{:?}\n{}", back, text);
        }

        #[test]
        fn arbitrary_strings_never_panic(text in any::<String>()) {
            check_round_trip_if_parses(&text)?;
            check_round_trip_if_parses(&format!("name='n'\nx = {text}\n"))?;
            check_round_trip_if_parses(&format!("name='n'\ndisk = [ {text:?} ]\n"))?;
        }

        #[test]
        fn xl_like_strings_never_panic(text in xl_ish()) {
            check_round_trip_if_parses(&text)?;
            check_round_trip_if_parses(&format!("name='n'\n{text}"))?;
        }

        #[test]
        fn disk_specs_from_pieces(pieces in proptest::collection::vec(prop_oneof![
            Just("/x"), Just("raw"), Just("qcow2"), Just("xvda"), Just("hdc:cdrom"), Just("rw"),
            Just("ro"), Just(""), Just("cdrom"), Just("phy:/dev/a"), Just("tap:aio:/b"),
            Just("target=/t,u"), Just("vdev=xvdb"), Just("format=vhd"), Just("discard"),
            Just("backend=d"), Just("drbd:r"), Just(" "),
        ], 0..7)) {
            check_round_trip_if_parses(&pieces.join(","))?;
        }
    }
}
