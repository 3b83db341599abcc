"""The C++ kernels' build cache (``ops.native_build``): a kernel built once is found again,
and a compiler of another release at the same path (an upgrade, or another node's image
sharing the home directory) builds its own binary rather than loading one it did not make."""

import os
import stat

from cope_megatron.ops import native_build


def test_a_compiler_of_another_release_builds_its_own(monkeypatch, tmp_path):
    cxx = native_build.compiler()
    assert cxx is not None, "the kernels' tests need a C++ compiler (g++, c++ or $CXX)"
    wrapper = tmp_path / "cxx"  # the real compiler, answering --version with $RELEASE
    wrapper.write_text('#!/bin/sh\n[ "$1" = --version ] && { echo "g++ $RELEASE"; exit 0; }\n'
                       f'exec {cxx} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("COPE_MEGATRON_CACHE", str(tmp_path / "cache"))
    source = native_build.CSRC / "cope_band.cpp"

    def build(release: str):
        monkeypatch.setenv("RELEASE", release)
        native_build._compiler_version.cache_clear()  # a new process would ask again
        return native_build._build(source, str(wrapper))

    first = build("12.2")
    stamp = first.stat().st_mtime_ns
    assert build("12.2") == first and first.stat().st_mtime_ns == stamp  # found, not rebuilt
    upgraded = build("13.1")
    assert upgraded != first and upgraded.exists()
    assert sorted(os.listdir(tmp_path / "cache")) == sorted([first.name, upgraded.name])
    native_build._compiler_version.cache_clear()
