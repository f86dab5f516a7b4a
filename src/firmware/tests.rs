//! Builds against a small Klipper-like tree (benches/fixture_tree.py): real make, real gcc,
//! a git version, and Klipper's version-relink trap.

use super::*;
use std::process::Command;
use std::time::SystemTime;

struct Fixture {
    tmp: tempfile::TempDir,
    tree: PathBuf,
    builds: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("klipper");
    let generator = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/fixture_tree.py");
    let status = Command::new("python3")
        .arg(&generator)
        .arg(&tree)
        .status()
        .unwrap();
    assert!(status.success(), "fixture generator failed");
    let builds = tmp.path().join("state/builds");
    Fixture { tmp, tree, builds }
}

impl Fixture {
    fn config(&self, key: &str, text: &str) -> PathBuf {
        let dir = self.tmp.path().join("state/configs");
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{key}.config"));
        fs::write(&path, text).unwrap();
        path
    }
    fn req(&self, key: &str, config: &Path) -> BuildRequest {
        BuildRequest {
            key: key.to_owned(),
            config: config.to_owned(),
            klipper_dir: self.tree.clone(),
            builds_dir: self.builds.clone(),
            timeout: Duration::from_secs(120),
        }
    }
    fn git(&self, args: &[&str]) {
        let status = Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
            .args(args)
            .current_dir(&self.tree)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "git {args:?}");
    }
    fn commit_file(&self, rel: &str, text: &str, message: &str) {
        fs::write(self.tree.join(rel), text).unwrap();
        self.git(&["commit", "-qam", message]);
    }
    /// Lines of make.log: one per make invocation in the tree.
    fn make_runs(&self) -> Vec<String> {
        fs::read_to_string(self.tree.join("make.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
    fn out(&self, key: &str) -> PathBuf {
        self.builds.join(key).join("out")
    }
}

fn build(reqs: &[BuildRequest]) -> Vec<Result<Firmware, Error>> {
    build_all(reqs, 4, &Cancel::new(), &events::discard())
}

fn ok(result: &Result<Firmware, Error>) -> &Firmware {
    match result {
        Ok(fw) => fw,
        Err(e) => panic!("build failed: {e}"),
    }
}

fn object_mtimes(out: &Path) -> HashMap<String, SystemTime> {
    fs::read_dir(out.join("src"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".o"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.metadata().unwrap().modified().unwrap(),
            )
        })
        .collect()
}

fn dict_version(path: &Path) -> String {
    let value: serde_json::Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
    value["version"].as_str().unwrap().to_owned()
}

use crate::events;

#[test]
fn parallel_builds_of_different_configs_do_not_clobber_each_other() {
    let fx = fixture();
    let rp = fx.config("rp", "CONFIG_MCU=\"rp2040\"\n");
    let f4 = fx.config("f4", "CONFIG_MCU=\"stm32f446xx\"\n");
    let host = fx.config("host", "CONFIG_MACH_LINUX=y\n");
    let events = Arc::new(Mutex::new(Vec::<Event>::new()));
    let seen = events.clone();
    let sink: Sink = Arc::new(move |e: &Event| seen.lock().unwrap().push(e.clone()));
    let results = build_all(
        &[fx.req("rp", &rp), fx.req("f4", &f4), fx.req("host", &host)],
        3,
        &Cancel::new(),
        &sink,
    );
    let version = source_version(&fx.tree);
    assert!(version.starts_with("v0.1.0-0-g"), "{version}");
    for (result, key, mcu, image) in [
        (&results[0], "rp", "rp2040", "klipper.bin"),
        (&results[1], "f4", "stm32f446xx", "klipper.bin"),
        (&results[2], "host", "linux", "klipper.elf"),
    ] {
        let fw = ok(result);
        assert_eq!(fw.key, key);
        assert_eq!(fw.mcu, mcu);
        assert_eq!(fw.version, version);
        assert!(!fw.cached);
        assert_eq!(
            fw.image,
            fx.builds.join(key).join("firmware/current").join(image)
        );
        assert!(fw.image.is_file());
        assert_eq!(fw.dict().unwrap()["config"]["MCU"], mcu);
        // Each OUT's own autoconf carries its own MCU: nothing was shared.
        let autoconf = fs::read_to_string(fx.out(key).join("autoconf.h")).unwrap();
        if mcu == "linux" {
            assert!(autoconf.contains("CONFIG_MACH_LINUX 1"), "{autoconf}");
        } else {
            assert!(autoconf.contains(&format!("\"{mcu}\"")), "{autoconf}");
        }
        // Start and finish were reported for every device.
        let evs = events.lock().unwrap();
        let mine: Vec<_> = evs
            .iter()
            .filter(|e| e.device.as_deref() == Some(key))
            .collect();
        assert_eq!(mine.first().unwrap().fraction, Some(0.0));
        assert_eq!(mine.last().unwrap().fraction, Some(1.0));
        assert!(mine.iter().all(|e| e.stage == Stage::Build));
    }
    // The user's configs were only read; the working copies got olddefconfig's defaults.
    assert_eq!(fs::read_to_string(&rp).unwrap(), "CONFIG_MCU=\"rp2040\"\n");
    let work = fs::read_to_string(fx.builds.join("rp/config")).unwrap();
    assert!(work.contains("CONFIG_CLOCK_FREQ=48000000"), "{work}");
    // The source tree stayed clean: everything went to the OUT dirs.
    let status = Command::new("git")
        .args(["status", "--porcelain"])
        .current_dir(&fx.tree)
        .output()
        .unwrap();
    assert!(status.stdout.is_empty(), "{status:?}");
    let record: serde_json::Value =
        serde_json::from_slice(&fs::read(fx.builds.join("rp/build.json")).unwrap()).unwrap();
    assert_eq!(record["version"], 1);
    assert_eq!(record["source_version"], version.as_str());
}

#[test]
fn unchanged_devices_are_not_rebuilt_and_make_is_not_run() {
    let fx = fixture();
    let a = fx.config("a", "CONFIG_MCU=\"rp2040\"\n");
    let b = fx.config("b", "CONFIG_MCU=\"stm32f103xe\"\n");
    let reqs = [fx.req("a", &a), fx.req("b", &b)];
    assert_eq!(up_to_date(&reqs[0]), None);
    let first: Vec<Firmware> = build(&reqs).iter().map(|r| ok(r).clone()).collect();
    let runs = fx.make_runs().len();
    let planned = up_to_date(&reqs[0]).expect("built firmware is up to date");
    assert_eq!((planned.cached, &planned.image), (true, &first[0].image));
    let image_before = fs::read(&first[0].image).unwrap();
    let second = build(&reqs);
    for (fw1, result) in first.iter().zip(&second) {
        let fw2 = ok(result);
        assert!(fw2.cached, "{} rebuilt", fw2.key);
        assert_eq!(fw2.cache_key, fw1.cache_key);
        assert_eq!(fw2.image, fw1.image);
        assert_eq!(fw2.version, fw1.version);
    }
    assert_eq!(fx.make_runs().len(), runs, "make ran for a cached build");
    assert_eq!(fs::read(&first[0].image).unwrap(), image_before);
    assert!(!fx.builds.join("a/firmware/previous").exists());

    // The same config content rewritten (new mtime) passes the quick check too.
    fs::write(&a, "CONFIG_MCU=\"rp2040\"\n").unwrap();
    assert!(ok(&build(&reqs[..1])[0]).cached);
    // A config saved with the defaults olddefconfig would add is the same firmware: olddefconfig
    // runs, but not the compile.
    fs::write(&a, fs::read(fx.builds.join("a/config")).unwrap()).unwrap();
    let runs = fx.make_runs();
    let again = build(&reqs[..1]);
    assert!(ok(&again[0]).cached);
    let new_runs = &fx.make_runs()[runs.len()..];
    assert!(
        new_runs.iter().all(|r| !r.starts_with("all ")),
        "{new_runs:?}"
    );
}

#[test]
fn a_changed_source_recompiles_only_that_file() {
    let fx = fixture();
    let a = fx.config("a", "CONFIG_MCU=\"rp2040\"\n");
    let first = ok(&build(&[fx.req("a", &a)])[0]).clone();
    let before = object_mtimes(&fx.out("a"));
    fx.commit_file(
        "src/mod01.c",
        "int work_1(int n) { return n * 7; }\n",
        "change mod01",
    );
    let second = ok(&build(&[fx.req("a", &a)])[0]).clone();
    assert!(!second.cached);
    assert_ne!(second.cache_key, first.cache_key);
    assert_eq!(second.version, source_version(&fx.tree));
    assert_ne!(second.version, first.version);
    let after = object_mtimes(&fx.out("a"));
    let changed: Vec<_> = after
        .iter()
        .filter(|(name, t)| before.get(*name) != Some(t))
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(changed, ["mod01.o"]);
    // The last good firmware is kept as last-known-good.
    let previous = fx.builds.join("a/firmware/previous/klipper.dict");
    assert_eq!(dict_version(&previous), first.version);
    assert_eq!(dict_version(&second.dict_path), second.version);
}

#[test]
fn a_changed_header_recompiles_the_files_that_include_it() {
    let fx = fixture();
    let a = fx.config("a", "CONFIG_MCU=\"rp2040\"\n");
    ok(&build(&[fx.req("a", &a)])[0]);
    // A second, cached run must not lose make's header dependencies either.
    assert!(ok(&build(&[fx.req("a", &a)])[0]).cached);
    let before = object_mtimes(&fx.out("a"));
    fx.commit_file("src/board.h", "#define BOARD_SCALE 5\n", "board.h");
    let fw = ok(&build(&[fx.req("a", &a)])[0]).clone();
    assert_eq!(fw.version, source_version(&fx.tree));
    let after = object_mtimes(&fx.out("a"));
    assert_ne!(
        after["mod00.o"], before["mod00.o"],
        "header change not recompiled"
    );
    assert_eq!(after["mod01.o"], before["mod01.o"]);
}

#[test]
fn a_version_only_change_gets_the_new_version_into_the_firmware() {
    let fx = fixture();
    let a = fx.config("a", "CONFIG_MCU=\"rp2040\"\n");
    let first = ok(&build(&[fx.req("a", &a)])[0]).clone();
    let before = object_mtimes(&fx.out("a"));
    // A host-only update: no firmware source changes, but the tree's version does.
    fx.commit_file("docs/README.md", "Host-side change.\n", "docs");
    fx.git(&["tag", "v0.2.0"]);
    let version = source_version(&fx.tree);
    assert!(version.starts_with("v0.2.0-0-g"), "{version}");
    let second = ok(&build(&[fx.req("a", &a)])[0]).clone();
    assert_eq!(second.version, version);
    assert_eq!(dict_version(&second.dict_path), version);
    assert_eq!(dict_version(&fx.out("a").join("klipper.dict")), version);
    // The image embeds the new dictionary too.
    let image = fs::read(&second.image).unwrap();
    let elf = fs::read(fx.out("a").join("klipper.elf")).unwrap();
    let mut embedded = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::ZlibDecoder::new(&image[elf.len()..]),
        &mut embedded,
    )
    .unwrap();
    assert!(embedded.contains(&version), "{embedded}");
    assert_ne!(first.version, second.version);
    // Still incremental: no firmware source was recompiled.
    assert_eq!(object_mtimes(&fx.out("a")), before);
}

#[test]
fn firmware_for_another_mcu_than_the_config_is_refused() {
    let fx = fixture();
    let a = fx.config(
        "a",
        "CONFIG_MCU=\"rp2040\"\nCONFIG_FIXTURE_DICT_MCU=\"stm32h723xx\"\n",
    );
    let err = build(&[fx.req("a", &a)]).remove(0).unwrap_err();
    match &err {
        Error::McuMismatch {
            config_mcu,
            dict_mcu,
            ..
        } => {
            assert_eq!(config_mcu, "rp2040");
            assert_eq!(dict_mcu, "stm32h723xx");
        }
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains("rp2040"));
    assert!(!fx.builds.join("a/firmware/current").exists());
}

#[test]
fn a_hanging_build_times_out_and_names_the_command() {
    let fx = fixture();
    let a = fx.config("a", "CONFIG_MCU=\"rp2040\"\nCONFIG_FIXTURE_SLEEP=60\n");
    let mut req = fx.req("a", &a);
    req.timeout = Duration::from_secs(3);
    let started = Instant::now();
    let err = build(&[req]).remove(0).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(30));
    match &err {
        Error::Timeout { key, cmd, .. } => {
            assert_eq!(key, "a");
            assert!(
                cmd.contains("make") && cmd.contains("KCONFIG_CONFIG="),
                "{cmd}"
            );
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn a_failing_build_keeps_its_last_good_firmware_and_others_still_build() {
    let fx = fixture();
    let a = fx.config("a", "CONFIG_MCU=\"rp2040\"\n");
    let b = fx.config("b", "CONFIG_MCU=\"stm32f103xe\"\n");
    let reqs = [fx.req("a", &a), fx.req("b", &b)];
    let first: Vec<Firmware> = build(&reqs).iter().map(|r| ok(r).clone()).collect();
    let good_image = fs::read(&first[0].image).unwrap();
    let good_dict = fs::read(&first[0].dict_path).unwrap();
    fs::write(&a, "CONFIG_MCU=\"rp2040\"\nCONFIG_FIXTURE_FAIL=y\n").unwrap();
    fs::write(
        &b,
        "CONFIG_MCU=\"stm32f103xe\"\nCONFIG_CLOCK_FREQ=72000000\n",
    )
    .unwrap();
    let results = build(&reqs);
    let err = results[0].as_ref().unwrap_err();
    assert!(matches!(err, Error::Make { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("fixture failure requested"), "{msg}");
    assert!(msg.starts_with("a: "), "{msg}");
    let fw_b = ok(&results[1]);
    assert!(!fw_b.cached);
    assert_eq!(fw_b.dict().unwrap()["config"]["CLOCK_FREQ"], 72_000_000);
    assert_eq!(fs::read(&first[0].image).unwrap(), good_image);
    assert_eq!(fs::read(&first[0].dict_path).unwrap(), good_dict);
    assert!(!fx.builds.join("a/firmware/previous").exists());
}

#[test]
fn a_missing_cross_compiler_names_the_debian_packages() {
    let fx = fixture();
    let a = fx.config(
        "a",
        "CONFIG_MCU=\"stm32f446xx\"\nCONFIG_CROSS_PREFIX=\"kflash-test-arm-none-eabi-\"\n",
    );
    let err = build(&[fx.req("a", &a)]).remove(0).unwrap_err();
    assert!(matches!(err, Error::ToolchainMissing { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("kflash-test-arm-none-eabi-gcc"), "{msg}");
    assert!(
        msg.contains("gcc-arm-none-eabi binutils-arm-none-eabi libnewlib-arm-none-eabi"),
        "{msg}"
    );
}

#[test]
fn missing_config_and_tree_are_reported_per_device() {
    let fx = fixture();
    let good = fx.config("good", "CONFIG_MCU=\"rp2040\"\n");
    let mut no_tree = fx.req("no-tree", &good);
    no_tree.klipper_dir = fx.tmp.path().join("nowhere");
    let results = build(&[
        fx.req("no-config", &fx.tmp.path().join("missing.config")),
        no_tree,
        fx.req("good", &good),
        fx.req("good", &good),
    ]);
    let msg = results[0].as_ref().unwrap_err().to_string();
    assert!(msg.contains("missing.config"), "{msg}");
    assert!(matches!(results[0], Err(Error::ConfigMissing { .. })));
    let msg = results[1].as_ref().unwrap_err().to_string();
    assert!(
        msg.contains("nowhere") && msg.contains("klipper_dir"),
        "{msg}"
    );
    ok(&results[2]);
    assert!(matches!(results[3], Err(Error::DuplicateKey { .. })));
}

#[test]
fn a_dirty_tree_always_runs_make_and_gets_its_edits() {
    let fx = fixture();
    let a = fx.config("a", "CONFIG_MCU=\"rp2040\"\n");
    fs::write(
        fx.tree.join("src/mod00.c"),
        "int work_0(int n) { return n; }\n",
    )
    .unwrap();
    let first = ok(&build(&[fx.req("a", &a)])[0]).clone();
    assert!(first.version.contains("-dirty-"), "{}", first.version);
    // Edited again: same `git describe`, different content.
    fs::write(
        fx.tree.join("src/mod00.c"),
        "int work_0(int n) { return 2 * n; }\n",
    )
    .unwrap();
    let before = object_mtimes(&fx.out("a"));
    let second = ok(&build(&[fx.req("a", &a)])[0]).clone();
    assert!(!second.cached);
    assert_ne!(object_mtimes(&fx.out("a"))["mod00.o"], before["mod00.o"]);
}

#[test]
fn source_version_falls_back_to_the_version_file_then_question_mark() {
    let tmp = tempfile::tempdir().unwrap();
    assert_eq!(source_version(tmp.path()), "?");
    fs::create_dir(tmp.path().join("klippy")).unwrap();
    fs::write(tmp.path().join("klippy/.version"), "v0.12.0-1-gabc\n").unwrap();
    assert_eq!(source_version(tmp.path()), "v0.12.0-1-gabc");
}

#[test]
fn dictionary_versions_match_modulo_the_date_host_suffix() {
    assert!(version_matches(
        "v0.13.0-730-g84104bbbd",
        "v0.13.0-730-g84104bbbd"
    ));
    assert!(version_matches(
        "v0.13.0-730-g84104bbbd-dirty",
        "v0.13.0-730-g84104bbbd-dirty-20261121_080102-pi"
    ));
    assert!(!version_matches("v0.13.0-731-g1", "v0.13.0-730-g84104bbbd"));
    assert!(!version_matches("v0.13.0-73", "v0.13.0-730-g84104bbbd"));
    assert!(!version_matches("v0.13.0", "v0.13.0-dirty"));
}

#[test]
fn config_mcu_is_linux_for_the_linux_process() {
    assert_eq!(config_mcu(b"CONFIG_MACH_LINUX=y\n").unwrap(), "linux");
    assert_eq!(
        config_mcu(b"# c\nCONFIG_MCU=\"rp2040\"\n").unwrap(),
        "rp2040"
    );
    assert_eq!(config_mcu(b"# not a firmware config\n"), None);
}

/// A compiler and linker that wrap the system ones but report `version` for `--version`.
fn fake_toolchain(dir: &Path, version: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(dir).unwrap();
    for (tool, real) in [("gcc", "gcc"), ("ld", "ld")] {
        let path = dir.join(format!("tc-{tool}"));
        let script = format!(
            "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'tc-{tool} {version}'; exit 0; fi\n\
             exec {real} \"$@\"\n"
        );
        fs::write(&path, script).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
    format!("{}/tc-", dir.display())
}

#[test]
fn a_new_compiler_version_rebuilds_from_scratch() {
    let fx = fixture();
    let prefix = fake_toolchain(&fx.tmp.path().join("tc"), "12.2");
    let a = fx.config(
        "a",
        &format!("CONFIG_MCU=\"rp2040\"\nCONFIG_CROSS_PREFIX=\"{prefix}\"\n"),
    );
    let first = ok(&build(&[fx.req("a", &a)])[0]).clone();
    let record = fs::read_to_string(fx.builds.join("a/build.json")).unwrap();
    assert!(record.contains("tc-gcc 12.2"), "{record}");
    // Rewritten with the same identity (new mtime): the quick check misses, the full key
    // matches, nothing is compiled.
    fake_toolchain(&fx.tmp.path().join("tc"), "12.2");
    let runs = fx.make_runs().len();
    assert!(ok(&build(&[fx.req("a", &a)])[0]).cached);
    assert!(fx.make_runs()[runs..]
        .iter()
        .all(|r| !r.starts_with("all ")));
    // An upgraded compiler: every object is rebuilt with it.
    let before = object_mtimes(&fx.out("a"));
    fake_toolchain(&fx.tmp.path().join("tc"), "13.1");
    let second = ok(&build(&[fx.req("a", &a)])[0]).clone();
    assert!(!second.cached);
    assert_ne!(second.cache_key, first.cache_key);
    let after = object_mtimes(&fx.out("a"));
    assert_eq!(after.len(), before.len());
    assert!(
        after.iter().all(|(name, t)| before[name] != *t),
        "stale objects kept"
    );
}

#[test]
fn rerunning_make_that_changes_nothing_keeps_the_last_known_good() {
    let fx = fixture();
    let a = fx.config("a", "CONFIG_MCU=\"rp2040\"\n");
    let source = fx.tree.join("src/mod01.c");
    fs::write(&source, "int work_1(int n) { return n; }\n").unwrap();
    let first = ok(&build(&[fx.req("a", &a)])[0]).clone();
    let first_image = fs::read(&first.image).unwrap();
    fs::write(&source, "int work_1(int n) { return n + 1; }\n").unwrap();
    let second = ok(&build(&[fx.req("a", &a)])[0]).clone();
    let previous = fx.builds.join("a/firmware/previous/klipper.bin");
    assert_eq!(fs::read(&previous).unwrap(), first_image);
    assert_ne!(fs::read(&second.image).unwrap(), first_image);
    // Dirty tree, nothing changed: make runs (a dirty tree cannot be trusted) but relinks
    // nothing, and the last-known-good is not overwritten by a copy of current.
    let third = ok(&build(&[fx.req("a", &a)])[0]).clone();
    assert!(!third.cached);
    assert_eq!(third.version, second.version);
    assert_eq!(fs::read(&previous).unwrap(), first_image);
}

#[test]
fn cancelling_stops_running_builds() {
    let fx = fixture();
    let a = fx.config("a", "CONFIG_MCU=\"rp2040\"\nCONFIG_FIXTURE_SLEEP=60\n");
    let cancel = Cancel::new();
    let trigger = cancel.clone();
    // Cancel while make is compiling (as Ctrl+C would); the fixture then hangs for 60 s.
    let sink: Sink = Arc::new(move |e: &Event| {
        if e.message.contains("Compiling") {
            trigger.cancel();
        }
    });
    let started = Instant::now();
    let results = build_all(&[fx.req("a", &a)], 2, &cancel, &sink);
    assert!(
        matches!(results[0], Err(Error::Cancelled { .. })),
        "{:?}",
        results[0]
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(!fx.builds.join("a/firmware/current").exists());
}
