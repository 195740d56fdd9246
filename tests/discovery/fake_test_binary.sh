#!/usr/bin/env bash
# A stand-in for a Catch2 test binary in the tests of cmake/DiscoverTests.cmake
# (tests/CMakeLists.txt, "tests: discovery fails ..."), as the build runs it:
#   fake_test_binary.sh [SPEC] --list-test-names-only
# FAKE_LISTING=crash    aborts (SIGABRT) when asked to list: a binary whose static
#                       initialisation or MPI start-up crashes
# FAKE_LISTING=partial  exits 0 but lists one case under "[mpi]" and one under "~[mpi]", while
#                       the whole binary holds three: one would never be registered
case "${FAKE_LISTING:-}" in
crash)
  kill -ABRT $$
  ;;
partial)
  case "$1" in
  "[mpi]") echo "a multi-rank case" ;;
  "~[mpi]") echo "a serial case" ;;
  *) printf 'a serial case\na multi-rank case\na case neither listing holds\n' ;;
  esac
  ;;
*)
  echo "fake_test_binary.sh: set FAKE_LISTING to crash or partial" >&2
  exit 2
  ;;
esac
