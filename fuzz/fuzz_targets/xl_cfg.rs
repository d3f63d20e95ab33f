//! xl.cfg fuzzing: arbitrary bytes (as lossy UTF-8) go to the config parser and the disk-spec
//! parser. Nothing may panic; what parses must survive rendering: `to_xl` output parses back to an
//! equal config, and a disk's canonical `to_spec` parses back to the same disk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snap_orchestrator::xlcfg::{DiskSpec, parse, parse_disk_spec};

fn fields(d: &DiskSpec) -> impl PartialEq + std::fmt::Debug + '_ {
    (&d.target, d.format, &d.vdev, d.access, &d.backendtype, &d.devtype)
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(cfg) = parse(&text) {
        let rendered = cfg.to_xl();
        match parse(&rendered) {
            Ok(back) => assert_eq!(back, cfg, "to_xl round trip changed the config:\n{rendered}"),
            Err(e) => panic!("to_xl output does not parse: {e}\n{rendered}"),
        }
    }
    if let Ok(disk) = parse_disk_spec(&text) {
        let canonical = disk.to_spec();
        match parse_disk_spec(&canonical) {
            Ok(again) => {
                assert_eq!(fields(&again), fields(&disk), "to_spec changed the disk: {canonical}");
                assert_eq!(again.to_spec(), canonical, "to_spec is not stable");
            }
            Err(e) => panic!("to_spec output does not parse: {e}: {canonical}"),
        }
    }
});
