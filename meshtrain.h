// defines: nothing of its own — the umbrella header of the installed package: everything a
// program that trains its own model with meshtrain needs (docs/library.md). Include it as
// <meshtrain/meshtrain.h>, or include the parts (<meshtrain/core/mesh.h>, ...) directly.
#pragma once

// core: the process, the rank grid and communication, file formats.
#include "meshtrain/core/communicator.h"
#include "meshtrain/core/mesh.h"
#include "meshtrain/core/runtime.h"
#include "meshtrain/core/safetensors.h"
#include "meshtrain/core/token_file.h"

// parallel: the layout as a value, the model interface, the layers.
#include "meshtrain/parallel/column_parallel_fanout.h"
#include "meshtrain/parallel/column_parallel_linear.h"
#include "meshtrain/parallel/grouped_query_attention.h"
#include "meshtrain/parallel/parallel_layer_norm.h"
#include "meshtrain/parallel/parallel_mlp.h"
#include "meshtrain/parallel/parallel_model.h"
#include "meshtrain/parallel/parallel_plan.h"
#include "meshtrain/parallel/parallel_rms_norm.h"
#include "meshtrain/parallel/parallel_self_attention.h"
#include "meshtrain/parallel/parallel_swiglu.h"
#include "meshtrain/parallel/parallel_transformer_block.h"
#include "meshtrain/parallel/param_init.h"
#include "meshtrain/parallel/position_embedding.h"
#include "meshtrain/parallel/rotary_embedding.h"
#include "meshtrain/parallel/row_parallel_linear.h"
#include "meshtrain/parallel/vocab_parallel_cross_entropy.h"
#include "meshtrain/parallel/vocab_parallel_embedding.h"
#include "meshtrain/parallel/vocab_parallel_head.h"

// optim and memory: the optimizer, recomputation, the planner.
#include "meshtrain/memory/planner.h"
#include "meshtrain/optim/zero.h"

// launch: applying the layout, the training loop, checkpoints.
#include "meshtrain/launch/checkpoint.h"
#include "meshtrain/launch/parallelize.h"
#include "meshtrain/launch/trainer.h"
