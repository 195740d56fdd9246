# Writes CTEST_FILE with one add_test per Catch2 test case of TEST_EXECUTABLE.
# Test cases tagged [mpi] run under MPIEXEC at -np 2 and -np 4; the others run alone.
# Inputs: TEST_EXECUTABLE, CTEST_FILE, WITH_MPI, MPIEXEC (a ;-list), WORKING_DIR.

function(list_tests spec out)
  execute_process(
    COMMAND ${TEST_EXECUTABLE} ${spec} --list-test-names-only
    OUTPUT_VARIABLE output
    RESULT_VARIABLE result
    WORKING_DIRECTORY ${WORKING_DIR})
  if(result LESS 0)
    message(FATAL_ERROR "listing tests of ${TEST_EXECUTABLE} failed: ${output}")
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
foreach(test IN LISTS serial_tests)
  escape_name("${test}" spec)
  string(APPEND script "add_test([==[${test}]==] [==[${TEST_EXECUTABLE}]==] [==[${spec}]==])\n")
  string(APPEND script "set_tests_properties([==[${test}]==] PROPERTIES WORKING_DIRECTORY [==[${WORKING_DIR}]==] TIMEOUT 600 LABELS serial)\n")
endforeach()

list_tests("[mpi]" mpi_tests)
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
      string(APPEND launcher "-np ${np} ")
    endif()
    set(ctest_name "np${np}: ${test}")
    string(APPEND script "add_test([==[${ctest_name}]==] ${launcher}[==[${TEST_EXECUTABLE}]==] [==[${spec}]==])\n")
    string(APPEND script "set_tests_properties([==[${ctest_name}]==] PROPERTIES WORKING_DIRECTORY [==[${WORKING_DIR}]==] TIMEOUT 600 PROCESSORS ${np} LABELS mpi)\n")
  endforeach()
endforeach()
file(WRITE ${CTEST_FILE} "${script}")
