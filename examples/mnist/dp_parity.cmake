# The DP parity check (DESIGN §3, layout invariance): train_mnist on 1 process and on 2
# ranks under MPI, from the same seed and data, must end with the same weights after 10
# steps, within 1e-5 relative per tensor — and the 1-process run must have moved every tensor
# by more than 1e-3 relative from its initial values first (equal weights that never moved
# prove nothing). Fails otherwise, and prints the differences.
#   cmake -DTRAIN=... -DCOMPARE=... "-DMPIEXEC=mpiexec;--flag..." -DWORK_DIR=... [-DLR=0.05]
#         -P dp_parity.cmake
# LR (train_mnist's --lr) exists for the test that a run which does not move fails here.
set(job --limit-train 2048 --steps 10 --batch-size 128 --seed 7)
if(DEFINED LR)
  list(APPEND job --lr ${LR})
endif()
file(REMOVE_RECURSE ${WORK_DIR})
file(MAKE_DIRECTORY ${WORK_DIR})

function(run what)
  execute_process(COMMAND ${ARGN}
    RESULT_VARIABLE code OUTPUT_VARIABLE out ERROR_VARIABLE out TIMEOUT 300)
  string(REPLACE ";" " " shown "${ARGN}")
  if(NOT code STREQUAL "0")
    message(FATAL_ERROR "${what} failed (exit '${code}'):\n${shown}\n${out}")
  endif()
  message(STATUS "${what}:\n${shown}\n${out}")
endfunction()

run("DP=1" ${TRAIN} ${job} --save-initial-weights ${WORK_DIR}/initial.safetensors
    --save-weights ${WORK_DIR}/dp1.safetensors)
run("the DP=1 run moved every weight" ${COMPARE} ${WORK_DIR}/dp1.safetensors ${WORK_DIR}/initial.safetensors
    --min-change 1e-3)
run("DP=2" ${MPIEXEC} -np 2 ${TRAIN} ${job} --save-weights ${WORK_DIR}/dp2.safetensors)
run("compare" ${COMPARE} ${WORK_DIR}/dp2.safetensors ${WORK_DIR}/dp1.safetensors
    --tolerance 1e-5)
