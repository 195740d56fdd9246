# Writes CTEST_FILE with one add_test per Catch2 test case of TEST_EXECUTABLE.
# Test cases tagged [mpi] run under MPIEXEC at -np 2 and -np 4; the others run alone. Each gets
# MESHTRAIN_TEST_WORLD_SIZE (the test main refuses any other world size).
# Inputs: TEST_EXECUTABLE, CTEST_FILE, WITH_MPI, MPIEXEC (a ;-list), WORKING_DIR.
#
# The build fails when a listing fails (a crash or a failed MPI start-up while listing gives a
# non-zero exit or a message; the test main exits 0 after a listing) or when the two listings
# together hold fewer test cases than the binary: CTest would otherwise pass on what was left.

function(list_tests spec out)
  execute_process(
    COMMAND ${TEST_EXECUTABLE} ${spec} --list-test-names-only
    OUTPUT_VARIABLE output
    ERROR_VARIABLE errors
    RESULT_VARIABLE result
    WORKING_DIRECTORY ${WORKING_DIR})
  if(NOT result STREQUAL "0")
    message(FATAL_ERROR "listing the tests of ${TEST_EXECUTABLE} ${spec} failed (exit '${result}'); "
      "no test can be registered:\n${output}${errors}")
  endif()
  # A '[' in a test name would stop CMake from splitting the list at ';'.
  string(FIND "${output}" "[" bracket)
  if(NOT bracket EQUAL -1)
    message(FATAL_ERROR "test names may not contain '[' (CTest lists break on it): ${output}")
  endif()
  string(REPLACE "\n" ";" lines "${output}")
  set(names "")
  foreach(line IN LISTS lines)
    if(NOT line STREQUAL "")
      list(APPEND names "${line}")
    endif()
  endforeach()
  set(${out} "${names}" PARENT_SCOPE)
endfunction()

# Catch2 treats , [ ] as spec syntax inside a test name.
function(escape_name name out)
  foreach(char , [ ])
    string(REPLACE "${char}" "\\${char}" name "${name}")
  endforeach()
  set(${out} "${name}" PARENT_SCOPE)
endfunction()

set(script "")
list_tests("~[mpi]" serial_tests)
list_tests("[mpi]" mpi_tests)
list_tests("" all_tests)
list(LENGTH serial_tests serial_count)
list(LENGTH mpi_tests mpi_count)
list(LENGTH all_tests all_count)
math(EXPR listed "${serial_count} + ${mpi_count}")
if(NOT listed EQUAL all_count OR all_count EQUAL 0)
  message(FATAL_ERROR "${TEST_EXECUTABLE} holds ${all_count} test cases, but its [mpi] and "
    "~[mpi] listings hold ${mpi_count} + ${serial_count}: some would never run")
endif()

foreach(test IN LISTS serial_tests)
  escape_name("${test}" spec)
  string(APPEND script "add_test([==[${test}]==] [==[${TEST_EXECUTABLE}]==] [==[${spec}]==])\n")
  string(APPEND script "set_tests_properties([==[${test}]==] PROPERTIES WORKING_DIRECTORY [==[${WORKING_DIR}]==] TIMEOUT 600 LABELS serial ENVIRONMENT MESHTRAIN_TEST_WORLD_SIZE=1)\n")
endforeach()

if(WITH_MPI)
  set(counts 2 4)
else()
  set(counts 1)
endif()
foreach(np IN LISTS counts)
  foreach(test IN LISTS mpi_tests)
    escape_name("${test}" spec)
    set(launcher "")
    foreach(arg IN LISTS MPIEXEC)
      string(APPEND launcher "[==[${arg}]==] ")
    endforeach()
    if(WITH_MPI)
      # -x: mpirun passes the variable to every rank.
      string(APPEND launcher "-np ${np} -x MESHTRAIN_TEST_WORLD_SIZE=${np} ")
    endif()
    set(ctest_name "np${np}: ${test}")
    string(APPEND script "add_test([==[${ctest_name}]==] ${launcher}[==[${TEST_EXECUTABLE}]==] [==[${spec}]==])\n")
    string(APPEND script "set_tests_properties([==[${ctest_name}]==] PROPERTIES WORKING_DIRECTORY [==[${WORKING_DIR}]==] TIMEOUT 600 PROCESSORS ${np} LABELS mpi ENVIRONMENT MESHTRAIN_TEST_WORLD_SIZE=${np})\n")
  endforeach()
endforeach()
file(WRITE ${CTEST_FILE} "${script}")
