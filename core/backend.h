// defines: the process-level entry points each communication backend provides
// (comm_mpi.cpp or comm_single.cpp, chosen by CMake). Used by Runtime only.
#pragma once

#include "meshtrain/core/communicator.h"

namespace meshtrain::backend {

// Name of the backend compiled in ("mpi" or "single").
const char* name();
// Starts the transport (MPI_Init_thread with MPI_THREAD_MULTIPLE for MPI: each communicator
// runs its operations on its own worker thread, so several threads may be inside MPI at once).
void init(int* argc, char*** argv);
// Ends the transport; communicators still alive afterwards are inert.
void finalize();
// A fresh communicator over all processes of the job, named "world".
CommunicatorPtr make_world();
// This process's index among the processes on its node, and how many share the node.
void node_local(const CommunicatorPtr& world, int* local_rank, int* local_size);

} // namespace meshtrain::backend
