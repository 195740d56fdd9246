# The Llama example's CTest cases, registered by the MAIN project (examples/CMakeLists.txt):
# examples/llama is its own CMake project on the installed package, so its tests start by
# building it the way scripts/build.sh does — install this tree into build/install and build
# examples/llama into build/examples/llama against that prefix alone — and the other cases
# run those programs (fixture llama_build). The layout parity of the model itself is a Catch2
# test of meshtrain_tests (tests/test_llama.cpp, [llama], at -np 2 and -np 4).
add_test(NAME "llama: builds against the installed package alone"
  COMMAND ${CMAKE_COMMAND} -D BUILD_DIR=${PROJECT_BINARY_DIR}
    -P ${CMAKE_CURRENT_LIST_DIR}/build_against_install.cmake)
# Without ccache and with an empty build/examples/llama: a precompiled header and four
# translation units, minutes on 2 cores.
set_tests_properties("llama: builds against the installed package alone" PROPERTIES
  LABELS llama TIMEOUT 1800 PROCESSORS 2 FIXTURES_SETUP llama_build)

set(llama_bin ${PROJECT_BINARY_DIR}/examples/llama)
set(gpt_data ${PROJECT_BINARY_DIR}/examples/gpt) # the gpt_fortunes fixture's token files

# Bad command lines exit with code 2 and a message naming the value.
function(llama_expect_exit name code regex)
  add_test(NAME "llama: ${name}"
    COMMAND ${CMAKE_COMMAND} "-DCOMMAND=${ARGN}" -DEXPECT_CODE=${code}
      "-DEXPECT_REGEX=${regex}" -P ${PROJECT_SOURCE_DIR}/examples/mnist/expect_exit.cmake
    WORKING_DIRECTORY ${gpt_data})
  set_tests_properties("llama: ${name}" PROPERTIES LABELS llama TIMEOUT 120
    FIXTURES_REQUIRED llama_build)
endfunction()
llama_expect_exit("--n-kv-head 3 is rejected" 2
  "--n-kv-head 3 must divide --n-head 4" ${llama_bin}/train_llama --n-kv-head 3)
llama_expect_exit("--n-embd 36 --n-head 4 is rejected (odd head dim)" 2
  "the head dim must be even" ${llama_bin}/train_llama --n-embd 36 --n-head 4)
llama_expect_exit("--rope-theta 0.5 is rejected" 2 "--rope-theta 0.5: must be in"
  ${llama_bin}/train_llama --rope-theta 0.5)
llama_expect_exit("sample_llama without a model is rejected" 2
  "give one of --checkpoint DIR or --weights FILE.safetensors" ${llama_bin}/sample_llama)
if(MESHTRAIN_WITH_MPI)
  llama_expect_exit("--tp 4 with 2 kv heads is rejected on 4 ranks" 2
    "tp \\(4\\) must divide n_kv_head \\(2\\)"
    ${MPIEXEC_EXECUTABLE} --allow-run-as-root --oversubscribe --bind-to none -np 4
    ${llama_bin}/train_llama --tp 4)
endif()

# A few steps on the real corpus end to end: progress, validation, metrics file.
add_test(NAME "llama: train_llama smoke run on fortunes"
  COMMAND ${llama_bin}/train_llama --data fortunes_train.bin --val-data fortunes_val.bin
    --steps 4 --warmup 1 --n-layer 1 --n-embd 32 --n-head 4 --n-kv-head 2 --block-size 32
    --batch-size 4 --val-every 2 --val-batches 1 --log-every 1 --metrics llama_smoke.jsonl
  WORKING_DIRECTORY ${gpt_data})
set_tests_properties("llama: train_llama smoke run on fortunes" PROPERTIES
  LABELS llama TIMEOUT 120 FIXTURES_REQUIRED "llama_build;gpt_fortunes"
  PASS_REGULAR_EXPRESSION "model: Llama, .*step 4/4  val_loss [0-9.]+.*done: 4 steps \\(completed\\)")

# Export -> PyTorch, resharding, sampling with TP, with real ranks (check_llama.sh).
if(MESHTRAIN_WITH_MPI)
  foreach(case export-matches-pytorch reshard sample-runs-with-tp)
    add_test(NAME "llama: ${case}"
      COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/check_llama.sh ${case} ${PROJECT_BINARY_DIR}
        ${MPIEXEC_EXECUTABLE} --allow-run-as-root --oversubscribe --bind-to none
        -x MESHTRAIN_THREADS=1 -x OMP_NUM_THREADS=1
      WORKING_DIRECTORY ${gpt_data})
    set_tests_properties("llama: ${case}" PROPERTIES LABELS llama TIMEOUT 300 PROCESSORS 2
      FIXTURES_REQUIRED "llama_build;gpt_fortunes" SKIP_RETURN_CODE 77)
  endforeach()
endif()
