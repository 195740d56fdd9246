# Runs the out-of-tree consumer test (cmake -P). Inputs (-D): BUILD_DIR (a built meshtrain
# tree), PROJECT_DIR (tests/consumer/project), WORK_DIR (scratch, emptied first), GENERATOR,
# CXX_COMPILER, BUILD_TYPE, Torch_DIR (may be empty), MPIEXEC (empty: MPI backend not built).
#
# Steps: install BUILD_DIR into WORK_DIR/prefix; configure PROJECT_DIR with only that prefix
# in CMAKE_PREFIX_PATH; check find_package found the installed package, not the build tree;
# build; run the consumer alone, then on 2 ranks with mpirun and with the installed meshrun.

function(step what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  message(STATUS "${what}: exit ${rc}\n${out}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "consumer test failed at: ${what} (exit ${rc})")
  endif()
  set(step_output "${out}" PARENT_SCOPE)
endfunction()

# `ranks` lines of "consumer rank R/ranks ... OK" must be in the output, one per rank.
function(expect_ranks_ok what output ranks)
  math(EXPR last "${ranks} - 1")
  foreach(r RANGE ${last})
    if(NOT output MATCHES "consumer rank ${r}/${ranks} [^\n]* OK")
      message(FATAL_ERROR "${what}: no 'consumer rank ${r}/${ranks} ... OK' line")
    endif()
  endforeach()
endfunction()

foreach(var BUILD_DIR PROJECT_DIR WORK_DIR GENERATOR CXX_COMPILER)
  if(NOT ${var})
    message(FATAL_ERROR "run_consumer.cmake needs -D ${var}=...")
  endif()
endforeach()
if(NOT BUILD_TYPE)
  set(BUILD_TYPE Release)
endif()

set(prefix ${WORK_DIR}/prefix)
set(build ${WORK_DIR}/build)
file(REMOVE_RECURSE ${WORK_DIR})

step("install" ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix})
foreach(installed include/meshtrain/core/mesh.h include/meshtrain/core/runtime.h)
  if(NOT EXISTS ${prefix}/${installed})
    message(FATAL_ERROR "install: ${prefix}/${installed} is missing")
  endif()
endforeach()

set(configure_args -S ${PROJECT_DIR} -B ${build} -G ${GENERATOR}
  -D CMAKE_BUILD_TYPE=${BUILD_TYPE}
  -D CMAKE_CXX_COMPILER=${CXX_COMPILER}
  -D CMAKE_PREFIX_PATH=${prefix}
  # Only the install may satisfy find_package(meshtrain).
  -D CMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
if(Torch_DIR)
  list(APPEND configure_args -D Torch_DIR=${Torch_DIR})
endif()
step("configure" ${CMAKE_COMMAND} ${configure_args})
file(STRINGS ${build}/CMakeCache.txt found REGEX "^meshtrain_DIR:")
string(FIND "${found}" "${prefix}/" at)
if(NOT at GREATER -1)
  message(FATAL_ERROR "configure: find_package(meshtrain) used '${found}', not ${prefix}")
endif()

step("build" ${CMAKE_COMMAND} --build ${build})

step("run on 1 process" ${build}/consumer)
expect_ranks_ok("run on 1 process" "${step_output}" 1)

if(MPIEXEC)
  step("run on 2 ranks (mpirun)"
    ${MPIEXEC} --allow-run-as-root --oversubscribe --bind-to none -np 2 ${build}/consumer)
  expect_ranks_ok("run on 2 ranks (mpirun)" "${step_output}" 2)
  if(EXISTS ${prefix}/bin/meshrun)
    step("run on 2 ranks (installed meshrun)" ${prefix}/bin/meshrun -n 2 -- ${build}/consumer)
    expect_ranks_ok("run on 2 ranks (installed meshrun)" "${step_output}" 2)
  endif()
endif()
message(STATUS "consumer test passed")
