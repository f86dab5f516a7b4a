# Run by kflash (src/prewarm) with the Python that runs klippy, as
# `python chelper_build.py <klippy dir>`: asks that klippy's own chelper whether
# it would build c_helper.so at its next start, and with which command, without
# building anything. Prints one line: KFLASH-CHELPER {"command": ..., "dest": ...}
# ("command" is null when c_helper.so is up to date). Python 2 and 3, like klippy.
import json
import os
import sys


class WouldBuild(Exception):
    pass


def load_chelper(klippy_dir):
    path = os.path.join(klippy_dir, "chelper", "__init__.py")
    try:
        import importlib.util
    except ImportError:  # Python 2
        import imp

        return imp.load_source("kflash_prewarm_chelper", path)
    spec = importlib.util.spec_from_file_location("kflash_prewarm_chelper", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def would_build(cmd):
    raise WouldBuild(cmd)


def main():
    chelper = load_chelper(sys.argv[1])
    # get_ffi() decides (sources newer than the helper) and composes the compiler
    # command; it hands that command to do_build_code, which would run it in place.
    for name in ("get_ffi", "do_build_code", "DEST_LIB"):
        if not hasattr(chelper, name):
            sys.stderr.write("this chelper has no %s: not the shape kflash knows\n" % name)
            return 3
    chelper.do_build_code = would_build
    srcdir = os.path.dirname(os.path.realpath(chelper.__file__))
    answer = {"command": None, "dest": os.path.join(srcdir, chelper.DEST_LIB)}
    try:
        chelper.get_ffi()
    except WouldBuild as e:
        answer["command"] = e.args[0]
    sys.stdout.write("KFLASH-CHELPER " + json.dumps(answer) + "\n")
    return 0


sys.exit(main())
