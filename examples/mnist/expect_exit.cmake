# Runs COMMAND (a ;-list) and fails unless it exits with EXPECT_CODE and its output (stdout
# and stderr) matches the regular expression EXPECT_REGEX.
#   cmake "-DCOMMAND=prog;--flag;value" -DEXPECT_CODE=2 "-DEXPECT_REGEX=..." -P expect_exit.cmake
execute_process(COMMAND ${COMMAND}
  RESULT_VARIABLE code OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 100)
string(REPLACE ";" " " shown "${COMMAND}")
if(NOT code STREQUAL "${EXPECT_CODE}")
  message(FATAL_ERROR "${shown}\nexited with '${code}', expected ${EXPECT_CODE}\n"
    "stdout:\n${out}\nstderr:\n${err}")
endif()
if(NOT "${out}${err}" MATCHES "${EXPECT_REGEX}")
  message(FATAL_ERROR "${shown}\nexited with ${code} as expected, but its output does not match "
    "'${EXPECT_REGEX}'\nstdout:\n${out}\nstderr:\n${err}")
endif()
message(STATUS "${shown}\nexited with ${code}: ${err}")
