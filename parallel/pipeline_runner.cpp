// defines: run_pipeline_actions (see pipeline_runner.h).
#include "meshtrain/parallel/pipeline_runner.h"

#include "meshtrain/core/errors.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <utility>

namespace meshtrain {
namespace {

using Kind = PipelineActionKind;

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int activation_tag(int from_stage) {
  return 2 * from_stage;
}
int gradient_tag(int from_stage) {
  return 2 * from_stage + 1;
}

} // namespace

PipelineRunRecord run_pipeline_actions(const PipelineScheduleSpec& spec,
                                       const PipelineActions& actions, Communicator& pp,
                                       const PipelineStageFunctions& stage) {
  MT_CHECK(pp.size() == spec.ranks, "pipeline schedule (", spec.describe(), ") on a pp group of ",
           pp.size(), " ranks");
  const int last = spec.stages() - 1;
  // (micro-batch, stage) -> the tensor received for it / the output it produced.
  std::map<std::pair<int, int>, at::Tensor> inputs;
  std::map<std::pair<int, int>, at::Tensor> output_grads;
  // Sends in flight with their tensors (alive until sent; dropped once done, so a sent
  // activation's memory goes with its micro-batch).
  std::vector<std::pair<WorkPtr, at::Tensor>> sends;
  std::map<std::pair<int, int>, at::Tensor> outputs;
  std::map<std::pair<int, int>, at::Tensor> input_grads;
  PipelineRunRecord record;
  const auto take = [](std::map<std::pair<int, int>, at::Tensor>& from, int mb, int s) {
    const auto found = from.find({mb, s});
    if (found == from.end()) {
      return at::Tensor();
    }
    auto tensor = std::move(found->second);
    from.erase(found);
    return tensor;
  };
  for (const auto& a : actions) {
    const int mb = a.micro_batch;
    const int s = a.stage;
    const double begin = now_s();
    switch (a.kind) {
    case Kind::kRecvActivation: {
      if (spec.rank_of(s - 1) == pp.rank()) {
        continue; // handed over by this rank's send (pp 1 with virtual stages)
      }
      auto buffer = stage.message_buffer(mb, s - 1);
      pp.recv_async(buffer, spec.rank_of(s - 1), activation_tag(s - 1))->wait();
      inputs[{mb, s}] = std::move(buffer);
      continue;
    }
    case Kind::kRecvGradient: {
      if (spec.rank_of(s + 1) == pp.rank()) {
        continue; // handed over by this rank's send
      }
      auto buffer = stage.message_buffer(mb, s);
      pp.recv_async(buffer, spec.rank_of(s + 1), gradient_tag(s + 1))->wait();
      output_grads[{mb, s}] = std::move(buffer);
      continue;
    }
    case Kind::kSendActivation: {
      auto tensor = take(outputs, mb, s);
      MT_CHECK(tensor.defined(), "pipeline stage ", s, " sends micro-batch ", mb,
               "'s activation, but its forward returned none");
      if (spec.rank_of(s + 1) == pp.rank()) {
        inputs[{mb, s + 1}] = std::move(tensor);
        continue;
      }
      tensor = tensor.contiguous();
      sends.emplace_back(pp.send_async(tensor, spec.rank_of(s + 1), activation_tag(s)), tensor);
      continue;
    }
    case Kind::kSendGradient: {
      auto tensor = take(input_grads, mb, s);
      MT_CHECK(tensor.defined(), "pipeline stage ", s, " sends micro-batch ", mb,
               "'s input gradient, but its backward returned none");
      if (spec.rank_of(s - 1) == pp.rank()) {
        output_grads[{mb, s - 1}] = std::move(tensor);
        continue;
      }
      tensor = tensor.contiguous();
      sends.emplace_back(pp.send_async(tensor, spec.rank_of(s - 1), gradient_tag(s)), tensor);
      continue;
    }
    case Kind::kForward: {
      auto output = stage.forward(mb, s, take(inputs, mb, s));
      if (s < last) {
        outputs[{mb, s}] = std::move(output);
      }
      break;
    }
    case Kind::kBackward:
    case Kind::kBackwardInput: {
      auto grad = stage.backward(mb, s, take(output_grads, mb, s), a.kind == Kind::kBackward);
      if (s > 0) {
        input_grads[{mb, s}] = std::move(grad);
      }
      break;
    }
    case Kind::kBackwardWeight:
      stage.backward_weight(mb, s);
      break;
    }
    record.compute.push_back({a, begin, now_s()});
    sends.erase(std::remove_if(sends.begin(), sends.end(),
                               [](const auto& send) { return send.first->is_completed(); }),
                sends.end());
  }
  for (auto& send : sends) {
    send.first->wait();
  }
  return record;
}

} // namespace meshtrain
