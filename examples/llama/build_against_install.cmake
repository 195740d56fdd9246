# Installs a built meshtrain tree into a prefix and builds examples/llama against that prefix
# ALONE (cmake -P). scripts/build.sh runs it after the main build; CTest runs it as
# "llama: builds against the installed package alone", the fixture of the Llama tests.
#
# Inputs (-D): BUILD_DIR (a built meshtrain tree). Optional: PREFIX (default
# BUILD_DIR/install), LLAMA_BUILD_DIR (default BUILD_DIR/examples/llama). The generator,
# compiler, compiler launcher, build type, sanitizer option and Torch_DIR are the main
# build's (read from its CMakeCache.txt), so both builds compile alike.
#
# Checks: find_package(meshtrain) resolved to PREFIX (never to the build or source tree), and
# every #include of examples/llama is <meshtrain/...>, a file of examples/llama, or a header
# of the system — no "meshtrain/..." or "examples/..." path into the source tree.
cmake_minimum_required(VERSION 3.18)

function(step what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "llama: ${what} failed (exit ${rc}):\n${out}")
  endif()
  set(step_output "${out}" PARENT_SCOPE)
endfunction()

if(NOT BUILD_DIR OR NOT EXISTS ${BUILD_DIR}/CMakeCache.txt)
  message(FATAL_ERROR "build_against_install.cmake needs -D BUILD_DIR=<a configured and built meshtrain tree>")
endif()
get_filename_component(BUILD_DIR ${BUILD_DIR} ABSOLUTE)
if(NOT PREFIX)
  set(PREFIX ${BUILD_DIR}/install)
endif()
if(NOT LLAMA_BUILD_DIR)
  set(LLAMA_BUILD_DIR ${BUILD_DIR}/examples/llama)
endif()
set(source_dir ${CMAKE_CURRENT_LIST_DIR})

# The sources include only public, namespaced headers.
file(GLOB sources ${source_dir}/*.h ${source_dir}/*.cpp)
foreach(file IN LISTS sources)
  file(STRINGS ${file} includes REGEX "^[ \t]*#[ \t]*include")
  foreach(line IN LISTS includes)
    if(line MATCHES "\"([^\"]+)\"")
      if(NOT EXISTS ${source_dir}/${CMAKE_MATCH_1})
        message(FATAL_ERROR "llama: ${file}: '${line}' is not a file of examples/llama; include "
                            "the installed package's headers as <meshtrain/...>")
      endif()
    endif()
  endforeach()
endforeach()

# The main build's settings.
file(STRINGS ${BUILD_DIR}/CMakeCache.txt cache)
set(cache_args "")
foreach(entry IN LISTS cache)
  if(entry MATCHES "^CMAKE_GENERATOR:INTERNAL=(.*)$")
    set(generator "${CMAKE_MATCH_1}")
  elseif(entry MATCHES "^(CMAKE_CXX_COMPILER|CMAKE_CXX_COMPILER_LAUNCHER|CMAKE_BUILD_TYPE|MESHTRAIN_SANITIZE|Torch_DIR):[A-Z]+=(.+)$")
    list(APPEND cache_args "-D${CMAKE_MATCH_1}=${CMAKE_MATCH_2}")
  endif()
endforeach()

step("install into ${PREFIX}" ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${PREFIX})
step("configure ${LLAMA_BUILD_DIR}" ${CMAKE_COMMAND} -S ${source_dir} -B ${LLAMA_BUILD_DIR}
  -G ${generator} ${cache_args}
  -D CMAKE_PREFIX_PATH=${PREFIX}
  # Only the install may satisfy find_package(meshtrain).
  -D CMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
file(STRINGS ${LLAMA_BUILD_DIR}/CMakeCache.txt found REGEX "^meshtrain_DIR:")
string(FIND "${found}" "${PREFIX}/" at)
if(NOT at GREATER -1)
  message(FATAL_ERROR "llama: find_package(meshtrain) used '${found}', not ${PREFIX}")
endif()
step("build ${LLAMA_BUILD_DIR}" ${CMAKE_COMMAND} --build ${LLAMA_BUILD_DIR})
foreach(program train_llama sample_llama)
  if(NOT EXISTS ${LLAMA_BUILD_DIR}/${program})
    message(FATAL_ERROR "llama: ${LLAMA_BUILD_DIR}/${program} was not built")
  endif()
endforeach()
message(STATUS "llama: built ${LLAMA_BUILD_DIR}/{train_llama,sample_llama} against ${found}")
