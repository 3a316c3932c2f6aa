"""Golden tests of the rewritten Dynamo-level graph (what the backend hands to lowering).

Regenerate with ``EXPECTTEST_ACCEPT=1 pytest tests/test_golden.py``; then read the diff.
"""

import torch
import torch.nn.functional as F
from expecttest import TestCase
from torch import nn
from torch._dynamo.testing import normalize_gm

import agpe_compile

from .models import MLP, BrokenMLP, GPTBlock, TiedLM

TORCH_BEFORE_2_13 = tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 13)


def rewritten_graphs(model, *inputs, **options):
    records = []
    backend = agpe_compile.AgpeBackend({"inductor": False, "block_size": 16, **options}, on_graph=records.append)
    torch.compile(model, backend=backend)(*inputs)
    return [normalize_gm(r.rewritten.print_readable(print_output=False)) for r in records]


class GoldenGraphs(TestCase):
    def setUp(self):
        torch._dynamo.reset()
        torch.manual_seed(0)

    def test_mlp(self):
        # Things to note: each torch._C._nn.linear became torch.ops.agpe.sparse_linear with the
        # same x, weight and bias; each layer added five placeholders after Dynamo's own
        # (mask, saliency, dense-grad scores, score flag, counters), in that order; the block
        # size and saliency mode are constants of the call, the mask contents are data.
        (graph,) = rewritten_graphs(MLP((32, 32, 16)), torch.randn(4, 32))
        self.assertExpectedInline(graph, """\
class AgpeGraphModule(torch.nn.Module):
    def forward(self, L_self_modules_layers_modules_0_parameters_weight_: "f32[32, 32]", L_self_modules_layers_modules_0_parameters_bias_: "f32[32]", L_x_: "f32[4, 32]", L_self_modules_layers_modules_1_parameters_weight_: "f32[16, 32]", L_self_modules_layers_modules_1_parameters_bias_: "f32[16]", agpe_layers_0_block_mask, agpe_layers_0_saliency, agpe_layers_0_saliency_dense_grad_sq, agpe_layers_0_saliency_score_dense, agpe_layers_0_saliency_counters, agpe_layers_0_block_layout, agpe_layers_1_block_mask, agpe_layers_1_saliency, agpe_layers_1_saliency_dense_grad_sq, agpe_layers_1_saliency_score_dense, agpe_layers_1_saliency_counters, agpe_layers_1_block_layout):
        l_self_modules_layers_modules_0_parameters_weight_ = L_self_modules_layers_modules_0_parameters_weight_
        l_self_modules_layers_modules_0_parameters_bias_ = L_self_modules_layers_modules_0_parameters_bias_
        l_x_ = L_x_
        l_self_modules_layers_modules_1_parameters_weight_ = L_self_modules_layers_modules_1_parameters_weight_
        l_self_modules_layers_modules_1_parameters_bias_ = L_self_modules_layers_modules_1_parameters_bias_

        sparse_linear_default: "f32[4, 32]" = torch.ops.agpe.sparse_linear.default(l_x_, l_self_modules_layers_modules_0_parameters_weight_, l_self_modules_layers_modules_0_parameters_bias_, agpe_layers_0_block_mask, agpe_layers_0_saliency, agpe_layers_0_saliency_dense_grad_sq, agpe_layers_0_saliency_score_dense, agpe_layers_0_saliency_counters, agpe_layers_0_block_layout, 16, 'taylor');  l_x_ = l_self_modules_layers_modules_0_parameters_weight_ = l_self_modules_layers_modules_0_parameters_bias_ = agpe_layers_0_block_mask = agpe_layers_0_saliency = agpe_layers_0_saliency_dense_grad_sq = agpe_layers_0_saliency_score_dense = agpe_layers_0_saliency_counters = agpe_layers_0_block_layout = None

        x_1: "f32[4, 32]" = torch.nn.functional.relu(sparse_linear_default);  sparse_linear_default = None

        sparse_linear_default_1: "f32[4, 16]" = torch.ops.agpe.sparse_linear.default(x_1, l_self_modules_layers_modules_1_parameters_weight_, l_self_modules_layers_modules_1_parameters_bias_, agpe_layers_1_block_mask, agpe_layers_1_saliency, agpe_layers_1_saliency_dense_grad_sq, agpe_layers_1_saliency_score_dense, agpe_layers_1_saliency_counters, agpe_layers_1_block_layout, 16, 'taylor');  x_1 = l_self_modules_layers_modules_1_parameters_weight_ = l_self_modules_layers_modules_1_parameters_bias_ = agpe_layers_1_block_mask = agpe_layers_1_saliency = agpe_layers_1_saliency_dense_grad_sq = agpe_layers_1_saliency_score_dense = agpe_layers_1_saliency_counters = agpe_layers_1_block_layout = None
        return (sparse_linear_default_1,)
""")

    def test_mlp_with_excluded_last_layer(self):
        # Things to note: layers.1 matched the exclude pattern, so its linear call is left
        # exactly as Dynamo traced it and it gets no extra placeholders.
        (graph,) = rewritten_graphs(MLP((32, 32, 16)), torch.randn(4, 32), exclude=["layers.1"])
        self.assertExpectedInline(graph, """\
class AgpeGraphModule(torch.nn.Module):
    def forward(self, L_self_modules_layers_modules_0_parameters_weight_: "f32[32, 32]", L_self_modules_layers_modules_0_parameters_bias_: "f32[32]", L_x_: "f32[4, 32]", L_self_modules_layers_modules_1_parameters_weight_: "f32[16, 32]", L_self_modules_layers_modules_1_parameters_bias_: "f32[16]", agpe_layers_0_block_mask, agpe_layers_0_saliency, agpe_layers_0_saliency_dense_grad_sq, agpe_layers_0_saliency_score_dense, agpe_layers_0_saliency_counters, agpe_layers_0_block_layout):
        l_self_modules_layers_modules_0_parameters_weight_ = L_self_modules_layers_modules_0_parameters_weight_
        l_self_modules_layers_modules_0_parameters_bias_ = L_self_modules_layers_modules_0_parameters_bias_
        l_x_ = L_x_
        l_self_modules_layers_modules_1_parameters_weight_ = L_self_modules_layers_modules_1_parameters_weight_
        l_self_modules_layers_modules_1_parameters_bias_ = L_self_modules_layers_modules_1_parameters_bias_

        sparse_linear_default: "f32[4, 32]" = torch.ops.agpe.sparse_linear.default(l_x_, l_self_modules_layers_modules_0_parameters_weight_, l_self_modules_layers_modules_0_parameters_bias_, agpe_layers_0_block_mask, agpe_layers_0_saliency, agpe_layers_0_saliency_dense_grad_sq, agpe_layers_0_saliency_score_dense, agpe_layers_0_saliency_counters, agpe_layers_0_block_layout, 16, 'taylor');  l_x_ = l_self_modules_layers_modules_0_parameters_weight_ = l_self_modules_layers_modules_0_parameters_bias_ = agpe_layers_0_block_mask = agpe_layers_0_saliency = agpe_layers_0_saliency_dense_grad_sq = agpe_layers_0_saliency_score_dense = agpe_layers_0_saliency_counters = agpe_layers_0_block_layout = None

        x_1: "f32[4, 32]" = torch.nn.functional.relu(sparse_linear_default);  sparse_linear_default = None

        x_2: "f32[4, 16]" = torch._C._nn.linear(x_1, l_self_modules_layers_modules_1_parameters_weight_, l_self_modules_layers_modules_1_parameters_bias_);  x_1 = l_self_modules_layers_modules_1_parameters_weight_ = l_self_modules_layers_modules_1_parameters_bias_ = None
        return (x_2,)
""")

    def test_transformer_encoder_layer(self):
        # Things to note: multi_head_attention_forward stays one fused call; its in_proj and
        # out_proj weights are routed through agpe.masked_weight (W*M, dense compute) while
        # linear1/linear2 become sparse_linear calls.
        model = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
        (graph,) = rewritten_graphs(model, torch.randn(2, 4, 32))
        if TORCH_BEFORE_2_13:
            # Dynamo before 2.13 names two of the layer's intermediate nodes differently
            # (torch 2.11 is the GPU machine's version); the rewrite is the same.
            self.assertExpectedInline(graph, """\
class AgpeGraphModule(torch.nn.Module):
    def forward(self, L_args_0_: "f32[2, 4, 32]", L_fn_modules_self_attn_parameters_in_proj_bias_: "f32[96]", L_fn_modules_self_attn_parameters_in_proj_weight_: "f32[96, 32]", L_fn_modules_self_attn_modules_out_proj_parameters_weight_: "f32[32, 32]", L_fn_modules_self_attn_modules_out_proj_parameters_bias_: "f32[32]", L_fn_modules_norm1_parameters_weight_: "f32[32]", L_fn_modules_norm1_parameters_bias_: "f32[32]", L_fn_modules_linear1_parameters_weight_: "f32[64, 32]", L_fn_modules_linear1_parameters_bias_: "f32[64]", L_fn_modules_linear2_parameters_weight_: "f32[32, 64]", L_fn_modules_linear2_parameters_bias_: "f32[32]", L_fn_modules_norm2_parameters_weight_: "f32[32]", L_fn_modules_norm2_parameters_bias_: "f32[32]", agpe_self_attn_in_proj_weight_block_mask, agpe_self_attn_in_proj_weight_saliency, agpe_self_attn_in_proj_weight_saliency_dense_grad_sq, agpe_self_attn_in_proj_weight_saliency_score_dense, agpe_self_attn_in_proj_weight_saliency_counters, agpe_self_attn_in_proj_weight_block_layout, agpe_self_attn_out_proj_block_mask, agpe_self_attn_out_proj_saliency, agpe_self_attn_out_proj_saliency_dense_grad_sq, agpe_self_attn_out_proj_saliency_score_dense, agpe_self_attn_out_proj_saliency_counters, agpe_self_attn_out_proj_block_layout, agpe_linear1_block_mask, agpe_linear1_saliency, agpe_linear1_saliency_dense_grad_sq, agpe_linear1_saliency_score_dense, agpe_linear1_saliency_counters, agpe_linear1_block_layout, agpe_linear2_block_mask, agpe_linear2_saliency, agpe_linear2_saliency_dense_grad_sq, agpe_linear2_saliency_score_dense, agpe_linear2_saliency_counters, agpe_linear2_block_layout):
        l_args_0_ = L_args_0_
        l_fn_modules_self_attn_parameters_in_proj_bias_ = L_fn_modules_self_attn_parameters_in_proj_bias_
        l_fn_modules_self_attn_parameters_in_proj_weight_ = L_fn_modules_self_attn_parameters_in_proj_weight_
        l_fn_modules_self_attn_modules_out_proj_parameters_weight_ = L_fn_modules_self_attn_modules_out_proj_parameters_weight_
        l_fn_modules_self_attn_modules_out_proj_parameters_bias_ = L_fn_modules_self_attn_modules_out_proj_parameters_bias_
        l_fn_modules_norm1_parameters_weight_ = L_fn_modules_norm1_parameters_weight_
        l_fn_modules_norm1_parameters_bias_ = L_fn_modules_norm1_parameters_bias_
        l_fn_modules_linear1_parameters_weight_ = L_fn_modules_linear1_parameters_weight_
        l_fn_modules_linear1_parameters_bias_ = L_fn_modules_linear1_parameters_bias_
        l_fn_modules_linear2_parameters_weight_ = L_fn_modules_linear2_parameters_weight_
        l_fn_modules_linear2_parameters_bias_ = L_fn_modules_linear2_parameters_bias_
        l_fn_modules_norm2_parameters_weight_ = L_fn_modules_norm2_parameters_weight_
        l_fn_modules_norm2_parameters_bias_ = L_fn_modules_norm2_parameters_bias_

        query: "f32[4, 2, 32]" = l_args_0_.transpose(1, 0)
        masked_weight_default: "f32[96, 32]" = torch.ops.agpe.masked_weight.default(l_fn_modules_self_attn_parameters_in_proj_weight_, agpe_self_attn_in_proj_weight_block_mask, agpe_self_attn_in_proj_weight_saliency, agpe_self_attn_in_proj_weight_saliency_dense_grad_sq, agpe_self_attn_in_proj_weight_saliency_score_dense, agpe_self_attn_in_proj_weight_saliency_counters, 16, 'taylor');  l_fn_modules_self_attn_parameters_in_proj_weight_ = agpe_self_attn_in_proj_weight_block_mask = agpe_self_attn_in_proj_weight_saliency = agpe_self_attn_in_proj_weight_saliency_dense_grad_sq = agpe_self_attn_in_proj_weight_saliency_score_dense = agpe_self_attn_in_proj_weight_saliency_counters = None
        masked_weight_default_1: "f32[32, 32]" = torch.ops.agpe.masked_weight.default(l_fn_modules_self_attn_modules_out_proj_parameters_weight_, agpe_self_attn_out_proj_block_mask, agpe_self_attn_out_proj_saliency, agpe_self_attn_out_proj_saliency_dense_grad_sq, agpe_self_attn_out_proj_saliency_score_dense, agpe_self_attn_out_proj_saliency_counters, 16, 'taylor');  l_fn_modules_self_attn_modules_out_proj_parameters_weight_ = agpe_self_attn_out_proj_block_mask = agpe_self_attn_out_proj_saliency = agpe_self_attn_out_proj_saliency_dense_grad_sq = agpe_self_attn_out_proj_saliency_score_dense = agpe_self_attn_out_proj_saliency_counters = None
        multi_head_attention_forward = torch.nn.functional.multi_head_attention_forward(query, query, query, 32, 2, masked_weight_default, l_fn_modules_self_attn_parameters_in_proj_bias_, None, None, False, 0.0, masked_weight_default_1, l_fn_modules_self_attn_modules_out_proj_parameters_bias_, training = True, key_padding_mask = None, need_weights = False, attn_mask = None, average_attn_weights = True, is_causal = False);  query = masked_weight_default = l_fn_modules_self_attn_parameters_in_proj_bias_ = masked_weight_default_1 = l_fn_modules_self_attn_modules_out_proj_parameters_bias_ = None
        attn_output: "f32[4, 2, 32]" = multi_head_attention_forward[0];  multi_head_attention_forward = None
        x: "f32[2, 4, 32]" = attn_output.transpose(1, 0);  attn_output = None
        dropout: "f32[2, 4, 32]" = torch.nn.functional.dropout(x, 0.0, True, False);  x = None
        add: "f32[2, 4, 32]" = l_args_0_ + dropout;  l_args_0_ = dropout = None
        x_1: "f32[2, 4, 32]" = torch.nn.functional.layer_norm(add, (32,), l_fn_modules_norm1_parameters_weight_, l_fn_modules_norm1_parameters_bias_, 1e-05);  add = l_fn_modules_norm1_parameters_weight_ = l_fn_modules_norm1_parameters_bias_ = None
        sparse_linear_default: "f32[2, 4, 64]" = torch.ops.agpe.sparse_linear.default(x_1, l_fn_modules_linear1_parameters_weight_, l_fn_modules_linear1_parameters_bias_, agpe_linear1_block_mask, agpe_linear1_saliency, agpe_linear1_saliency_dense_grad_sq, agpe_linear1_saliency_score_dense, agpe_linear1_saliency_counters, agpe_linear1_block_layout, 16, 'taylor');  l_fn_modules_linear1_parameters_weight_ = l_fn_modules_linear1_parameters_bias_ = agpe_linear1_block_mask = agpe_linear1_saliency = agpe_linear1_saliency_dense_grad_sq = agpe_linear1_saliency_score_dense = agpe_linear1_saliency_counters = agpe_linear1_block_layout = None
        relu: "f32[2, 4, 64]" = torch.nn.functional.relu(sparse_linear_default);  sparse_linear_default = None
        dropout_1: "f32[2, 4, 64]" = torch.nn.functional.dropout(relu, 0.0, True, False);  relu = None
        sparse_linear_default_1: "f32[2, 4, 32]" = torch.ops.agpe.sparse_linear.default(dropout_1, l_fn_modules_linear2_parameters_weight_, l_fn_modules_linear2_parameters_bias_, agpe_linear2_block_mask, agpe_linear2_saliency, agpe_linear2_saliency_dense_grad_sq, agpe_linear2_saliency_score_dense, agpe_linear2_saliency_counters, agpe_linear2_block_layout, 16, 'taylor');  dropout_1 = l_fn_modules_linear2_parameters_weight_ = l_fn_modules_linear2_parameters_bias_ = agpe_linear2_block_mask = agpe_linear2_saliency = agpe_linear2_saliency_dense_grad_sq = agpe_linear2_saliency_score_dense = agpe_linear2_saliency_counters = agpe_linear2_block_layout = None
        dropout_2: "f32[2, 4, 32]" = torch.nn.functional.dropout(sparse_linear_default_1, 0.0, True, False);  sparse_linear_default_1 = None
        add_1: "f32[2, 4, 32]" = x_1 + dropout_2;  x_1 = dropout_2 = None
        x_3: "f32[2, 4, 32]" = torch.nn.functional.layer_norm(add_1, (32,), l_fn_modules_norm2_parameters_weight_, l_fn_modules_norm2_parameters_bias_, 1e-05);  add_1 = l_fn_modules_norm2_parameters_weight_ = l_fn_modules_norm2_parameters_bias_ = None
        return (x_3,)
""")
            return
        self.assertExpectedInline(graph, """\
class AgpeGraphModule(torch.nn.Module):
    def forward(self, L_args_0_: "f32[2, 4, 32]", L_fn_modules_self_attn_parameters_in_proj_bias_: "f32[96]", L_fn_modules_self_attn_parameters_in_proj_weight_: "f32[96, 32]", L_fn_modules_self_attn_modules_out_proj_parameters_weight_: "f32[32, 32]", L_fn_modules_self_attn_modules_out_proj_parameters_bias_: "f32[32]", L_fn_modules_norm1_parameters_weight_: "f32[32]", L_fn_modules_norm1_parameters_bias_: "f32[32]", L_fn_modules_linear1_parameters_weight_: "f32[64, 32]", L_fn_modules_linear1_parameters_bias_: "f32[64]", L_fn_modules_linear2_parameters_weight_: "f32[32, 64]", L_fn_modules_linear2_parameters_bias_: "f32[32]", L_fn_modules_norm2_parameters_weight_: "f32[32]", L_fn_modules_norm2_parameters_bias_: "f32[32]", agpe_self_attn_in_proj_weight_block_mask, agpe_self_attn_in_proj_weight_saliency, agpe_self_attn_in_proj_weight_saliency_dense_grad_sq, agpe_self_attn_in_proj_weight_saliency_score_dense, agpe_self_attn_in_proj_weight_saliency_counters, agpe_self_attn_in_proj_weight_block_layout, agpe_self_attn_out_proj_block_mask, agpe_self_attn_out_proj_saliency, agpe_self_attn_out_proj_saliency_dense_grad_sq, agpe_self_attn_out_proj_saliency_score_dense, agpe_self_attn_out_proj_saliency_counters, agpe_self_attn_out_proj_block_layout, agpe_linear1_block_mask, agpe_linear1_saliency, agpe_linear1_saliency_dense_grad_sq, agpe_linear1_saliency_score_dense, agpe_linear1_saliency_counters, agpe_linear1_block_layout, agpe_linear2_block_mask, agpe_linear2_saliency, agpe_linear2_saliency_dense_grad_sq, agpe_linear2_saliency_score_dense, agpe_linear2_saliency_counters, agpe_linear2_block_layout):
        l_args_0_ = L_args_0_
        l_fn_modules_self_attn_parameters_in_proj_bias_ = L_fn_modules_self_attn_parameters_in_proj_bias_
        l_fn_modules_self_attn_parameters_in_proj_weight_ = L_fn_modules_self_attn_parameters_in_proj_weight_
        l_fn_modules_self_attn_modules_out_proj_parameters_weight_ = L_fn_modules_self_attn_modules_out_proj_parameters_weight_
        l_fn_modules_self_attn_modules_out_proj_parameters_bias_ = L_fn_modules_self_attn_modules_out_proj_parameters_bias_
        l_fn_modules_norm1_parameters_weight_ = L_fn_modules_norm1_parameters_weight_
        l_fn_modules_norm1_parameters_bias_ = L_fn_modules_norm1_parameters_bias_
        l_fn_modules_linear1_parameters_weight_ = L_fn_modules_linear1_parameters_weight_
        l_fn_modules_linear1_parameters_bias_ = L_fn_modules_linear1_parameters_bias_
        l_fn_modules_linear2_parameters_weight_ = L_fn_modules_linear2_parameters_weight_
        l_fn_modules_linear2_parameters_bias_ = L_fn_modules_linear2_parameters_bias_
        l_fn_modules_norm2_parameters_weight_ = L_fn_modules_norm2_parameters_weight_
        l_fn_modules_norm2_parameters_bias_ = L_fn_modules_norm2_parameters_bias_

        query: "f32[4, 2, 32]" = l_args_0_.transpose(1, 0)
        masked_weight_default: "f32[96, 32]" = torch.ops.agpe.masked_weight.default(l_fn_modules_self_attn_parameters_in_proj_weight_, agpe_self_attn_in_proj_weight_block_mask, agpe_self_attn_in_proj_weight_saliency, agpe_self_attn_in_proj_weight_saliency_dense_grad_sq, agpe_self_attn_in_proj_weight_saliency_score_dense, agpe_self_attn_in_proj_weight_saliency_counters, 16, 'taylor');  l_fn_modules_self_attn_parameters_in_proj_weight_ = agpe_self_attn_in_proj_weight_block_mask = agpe_self_attn_in_proj_weight_saliency = agpe_self_attn_in_proj_weight_saliency_dense_grad_sq = agpe_self_attn_in_proj_weight_saliency_score_dense = agpe_self_attn_in_proj_weight_saliency_counters = None
        masked_weight_default_1: "f32[32, 32]" = torch.ops.agpe.masked_weight.default(l_fn_modules_self_attn_modules_out_proj_parameters_weight_, agpe_self_attn_out_proj_block_mask, agpe_self_attn_out_proj_saliency, agpe_self_attn_out_proj_saliency_dense_grad_sq, agpe_self_attn_out_proj_saliency_score_dense, agpe_self_attn_out_proj_saliency_counters, 16, 'taylor');  l_fn_modules_self_attn_modules_out_proj_parameters_weight_ = agpe_self_attn_out_proj_block_mask = agpe_self_attn_out_proj_saliency = agpe_self_attn_out_proj_saliency_dense_grad_sq = agpe_self_attn_out_proj_saliency_score_dense = agpe_self_attn_out_proj_saliency_counters = None
        multi_head_attention_forward = torch.nn.functional.multi_head_attention_forward(query, query, query, 32, 2, masked_weight_default, l_fn_modules_self_attn_parameters_in_proj_bias_, None, None, False, 0.0, masked_weight_default_1, l_fn_modules_self_attn_modules_out_proj_parameters_bias_, training = True, key_padding_mask = None, need_weights = False, attn_mask = None, average_attn_weights = True, is_causal = False);  query = masked_weight_default = l_fn_modules_self_attn_parameters_in_proj_bias_ = masked_weight_default_1 = l_fn_modules_self_attn_modules_out_proj_parameters_bias_ = None
        attn_output: "f32[4, 2, 32]" = multi_head_attention_forward[0];  multi_head_attention_forward = None
        attn_output_1: "f32[2, 4, 32]" = attn_output.transpose(1, 0);  attn_output = None
        dropout: "f32[2, 4, 32]" = torch.nn.functional.dropout(attn_output_1, 0.0, True, False);  attn_output_1 = None
        add: "f32[2, 4, 32]" = l_args_0_ + dropout;  l_args_0_ = dropout = None
        x: "f32[2, 4, 32]" = torch.nn.functional.layer_norm(add, (32,), l_fn_modules_norm1_parameters_weight_, l_fn_modules_norm1_parameters_bias_, 1e-05);  add = l_fn_modules_norm1_parameters_weight_ = l_fn_modules_norm1_parameters_bias_ = None
        sparse_linear_default: "f32[2, 4, 64]" = torch.ops.agpe.sparse_linear.default(x, l_fn_modules_linear1_parameters_weight_, l_fn_modules_linear1_parameters_bias_, agpe_linear1_block_mask, agpe_linear1_saliency, agpe_linear1_saliency_dense_grad_sq, agpe_linear1_saliency_score_dense, agpe_linear1_saliency_counters, agpe_linear1_block_layout, 16, 'taylor');  l_fn_modules_linear1_parameters_weight_ = l_fn_modules_linear1_parameters_bias_ = agpe_linear1_block_mask = agpe_linear1_saliency = agpe_linear1_saliency_dense_grad_sq = agpe_linear1_saliency_score_dense = agpe_linear1_saliency_counters = agpe_linear1_block_layout = None
        relu: "f32[2, 4, 64]" = torch.nn.functional.relu(sparse_linear_default);  sparse_linear_default = None
        dropout_1: "f32[2, 4, 64]" = torch.nn.functional.dropout(relu, 0.0, True, False);  relu = None
        sparse_linear_default_1: "f32[2, 4, 32]" = torch.ops.agpe.sparse_linear.default(dropout_1, l_fn_modules_linear2_parameters_weight_, l_fn_modules_linear2_parameters_bias_, agpe_linear2_block_mask, agpe_linear2_saliency, agpe_linear2_saliency_dense_grad_sq, agpe_linear2_saliency_score_dense, agpe_linear2_saliency_counters, agpe_linear2_block_layout, 16, 'taylor');  dropout_1 = l_fn_modules_linear2_parameters_weight_ = l_fn_modules_linear2_parameters_bias_ = agpe_linear2_block_mask = agpe_linear2_saliency = agpe_linear2_saliency_dense_grad_sq = agpe_linear2_saliency_score_dense = agpe_linear2_saliency_counters = agpe_linear2_block_layout = None
        dropout_2: "f32[2, 4, 32]" = torch.nn.functional.dropout(sparse_linear_default_1, 0.0, True, False);  sparse_linear_default_1 = None
        add_1: "f32[2, 4, 32]" = x + dropout_2;  x = dropout_2 = None
        x_2: "f32[2, 4, 32]" = torch.nn.functional.layer_norm(add_1, (32,), l_fn_modules_norm2_parameters_weight_, l_fn_modules_norm2_parameters_bias_, 1e-05);  add_1 = l_fn_modules_norm2_parameters_weight_ = l_fn_modules_norm2_parameters_bias_ = None
        return (x_2,)
""")

    def test_gpt_block(self):
        # Things to note: qkv, proj, fc1, fc2 are rewritten; the split, SDPA, layer norms and
        # gelu are untouched and go to Inductor as usual.
        (graph,) = rewritten_graphs(GPTBlock(32, 2), torch.randn(2, 4, 32))
        self.assertExpectedInline(graph, """\
class AgpeGraphModule(torch.nn.Module):
    def forward(self, L_x_: "f32[2, 4, 32]", L_self_modules_ln1_parameters_weight_: "f32[32]", L_self_modules_ln1_parameters_bias_: "f32[32]", L_self_modules_qkv_parameters_weight_: "f32[96, 32]", L_self_modules_qkv_parameters_bias_: "f32[96]", L_self_modules_proj_parameters_weight_: "f32[32, 32]", L_self_modules_proj_parameters_bias_: "f32[32]", L_self_modules_ln2_parameters_weight_: "f32[32]", L_self_modules_ln2_parameters_bias_: "f32[32]", L_self_modules_fc1_parameters_weight_: "f32[128, 32]", L_self_modules_fc1_parameters_bias_: "f32[128]", L_self_modules_fc2_parameters_weight_: "f32[32, 128]", L_self_modules_fc2_parameters_bias_: "f32[32]", agpe_qkv_block_mask, agpe_qkv_saliency, agpe_qkv_saliency_dense_grad_sq, agpe_qkv_saliency_score_dense, agpe_qkv_saliency_counters, agpe_qkv_block_layout, agpe_proj_block_mask, agpe_proj_saliency, agpe_proj_saliency_dense_grad_sq, agpe_proj_saliency_score_dense, agpe_proj_saliency_counters, agpe_proj_block_layout, agpe_fc1_block_mask, agpe_fc1_saliency, agpe_fc1_saliency_dense_grad_sq, agpe_fc1_saliency_score_dense, agpe_fc1_saliency_counters, agpe_fc1_block_layout, agpe_fc2_block_mask, agpe_fc2_saliency, agpe_fc2_saliency_dense_grad_sq, agpe_fc2_saliency_score_dense, agpe_fc2_saliency_counters, agpe_fc2_block_layout):
        l_x_ = L_x_
        l_self_modules_ln1_parameters_weight_ = L_self_modules_ln1_parameters_weight_
        l_self_modules_ln1_parameters_bias_ = L_self_modules_ln1_parameters_bias_
        l_self_modules_qkv_parameters_weight_ = L_self_modules_qkv_parameters_weight_
        l_self_modules_qkv_parameters_bias_ = L_self_modules_qkv_parameters_bias_
        l_self_modules_proj_parameters_weight_ = L_self_modules_proj_parameters_weight_
        l_self_modules_proj_parameters_bias_ = L_self_modules_proj_parameters_bias_
        l_self_modules_ln2_parameters_weight_ = L_self_modules_ln2_parameters_weight_
        l_self_modules_ln2_parameters_bias_ = L_self_modules_ln2_parameters_bias_
        l_self_modules_fc1_parameters_weight_ = L_self_modules_fc1_parameters_weight_
        l_self_modules_fc1_parameters_bias_ = L_self_modules_fc1_parameters_bias_
        l_self_modules_fc2_parameters_weight_ = L_self_modules_fc2_parameters_weight_
        l_self_modules_fc2_parameters_bias_ = L_self_modules_fc2_parameters_bias_

        layer_norm: "f32[2, 4, 32]" = torch.nn.functional.layer_norm(l_x_, (32,), l_self_modules_ln1_parameters_weight_, l_self_modules_ln1_parameters_bias_, 1e-05);  l_self_modules_ln1_parameters_weight_ = l_self_modules_ln1_parameters_bias_ = None
        sparse_linear_default: "f32[2, 4, 96]" = torch.ops.agpe.sparse_linear.default(layer_norm, l_self_modules_qkv_parameters_weight_, l_self_modules_qkv_parameters_bias_, agpe_qkv_block_mask, agpe_qkv_saliency, agpe_qkv_saliency_dense_grad_sq, agpe_qkv_saliency_score_dense, agpe_qkv_saliency_counters, agpe_qkv_block_layout, 16, 'taylor');  layer_norm = l_self_modules_qkv_parameters_weight_ = l_self_modules_qkv_parameters_bias_ = agpe_qkv_block_mask = agpe_qkv_saliency = agpe_qkv_saliency_dense_grad_sq = agpe_qkv_saliency_score_dense = agpe_qkv_saliency_counters = agpe_qkv_block_layout = None
        split = sparse_linear_default.split(32, dim = -1);  sparse_linear_default = None
        q: "f32[2, 4, 32]" = split[0]
        k: "f32[2, 4, 32]" = split[1]
        v: "f32[2, 4, 32]" = split[2];  split = None

        view: "f32[2, 4, 2, 16]" = q.view(2, 4, 2, 16);  q = None
        q_1: "f32[2, 2, 4, 16]" = view.transpose(1, 2);  view = None
        view_1: "f32[2, 4, 2, 16]" = k.view(2, 4, 2, 16);  k = None
        k_1: "f32[2, 2, 4, 16]" = view_1.transpose(1, 2);  view_1 = None
        view_2: "f32[2, 4, 2, 16]" = v.view(2, 4, 2, 16);  v = None
        v_1: "f32[2, 2, 4, 16]" = view_2.transpose(1, 2);  view_2 = None

        y: "f32[2, 2, 4, 16]" = torch._C._nn.scaled_dot_product_attention(q_1, k_1, v_1, is_causal = True);  q_1 = k_1 = v_1 = None

        transpose_3: "f32[2, 4, 2, 16]" = y.transpose(1, 2);  y = None
        reshape: "f32[2, 4, 32]" = transpose_3.reshape(2, 4, 32);  transpose_3 = None
        sparse_linear_default_1: "f32[2, 4, 32]" = torch.ops.agpe.sparse_linear.default(reshape, l_self_modules_proj_parameters_weight_, l_self_modules_proj_parameters_bias_, agpe_proj_block_mask, agpe_proj_saliency, agpe_proj_saliency_dense_grad_sq, agpe_proj_saliency_score_dense, agpe_proj_saliency_counters, agpe_proj_block_layout, 16, 'taylor');  reshape = l_self_modules_proj_parameters_weight_ = l_self_modules_proj_parameters_bias_ = agpe_proj_block_mask = agpe_proj_saliency = agpe_proj_saliency_dense_grad_sq = agpe_proj_saliency_score_dense = agpe_proj_saliency_counters = agpe_proj_block_layout = None
        x: "f32[2, 4, 32]" = l_x_ + sparse_linear_default_1;  l_x_ = sparse_linear_default_1 = None

        layer_norm_1: "f32[2, 4, 32]" = torch.nn.functional.layer_norm(x, (32,), l_self_modules_ln2_parameters_weight_, l_self_modules_ln2_parameters_bias_, 1e-05);  l_self_modules_ln2_parameters_weight_ = l_self_modules_ln2_parameters_bias_ = None
        sparse_linear_default_2: "f32[2, 4, 128]" = torch.ops.agpe.sparse_linear.default(layer_norm_1, l_self_modules_fc1_parameters_weight_, l_self_modules_fc1_parameters_bias_, agpe_fc1_block_mask, agpe_fc1_saliency, agpe_fc1_saliency_dense_grad_sq, agpe_fc1_saliency_score_dense, agpe_fc1_saliency_counters, agpe_fc1_block_layout, 16, 'taylor');  layer_norm_1 = l_self_modules_fc1_parameters_weight_ = l_self_modules_fc1_parameters_bias_ = agpe_fc1_block_mask = agpe_fc1_saliency = agpe_fc1_saliency_dense_grad_sq = agpe_fc1_saliency_score_dense = agpe_fc1_saliency_counters = agpe_fc1_block_layout = None
        gelu: "f32[2, 4, 128]" = torch._C._nn.gelu(sparse_linear_default_2);  sparse_linear_default_2 = None
        sparse_linear_default_3: "f32[2, 4, 32]" = torch.ops.agpe.sparse_linear.default(gelu, l_self_modules_fc2_parameters_weight_, l_self_modules_fc2_parameters_bias_, agpe_fc2_block_mask, agpe_fc2_saliency, agpe_fc2_saliency_dense_grad_sq, agpe_fc2_saliency_score_dense, agpe_fc2_saliency_counters, agpe_fc2_block_layout, 16, 'taylor');  gelu = l_self_modules_fc2_parameters_weight_ = l_self_modules_fc2_parameters_bias_ = agpe_fc2_block_mask = agpe_fc2_saliency = agpe_fc2_saliency_dense_grad_sq = agpe_fc2_saliency_score_dense = agpe_fc2_saliency_counters = agpe_fc2_block_layout = None
        add_1: "f32[2, 4, 32]" = x + sparse_linear_default_3;  x = sparse_linear_default_3 = None
        return (add_1,)
""")

    def test_tied_embedding_output_projection(self):
        # Things to note: the embedding table is also the head's weight (one placeholder used
        # by embedding and by linear); the head stays a plain linear call, only fc is rewritten.
        (graph,) = rewritten_graphs(TiedLM(64, 32), torch.randint(0, 64, (2, 5)))
        self.assertExpectedInline(graph, """\
class AgpeGraphModule(torch.nn.Module):
    def forward(self, L_self_modules_embed_parameters_weight_: "f32[64, 32]", L_tokens_: "i64[2, 5]", L_self_modules_fc_parameters_weight_: "f32[32, 32]", L_self_modules_fc_parameters_bias_: "f32[32]", agpe_fc_block_mask, agpe_fc_saliency, agpe_fc_saliency_dense_grad_sq, agpe_fc_saliency_score_dense, agpe_fc_saliency_counters, agpe_fc_block_layout):
        l_self_modules_embed_parameters_weight_ = L_self_modules_embed_parameters_weight_
        l_tokens_ = L_tokens_
        l_self_modules_fc_parameters_weight_ = L_self_modules_fc_parameters_weight_
        l_self_modules_fc_parameters_bias_ = L_self_modules_fc_parameters_bias_

        embedding: "f32[2, 5, 32]" = torch.nn.functional.embedding(l_tokens_, l_self_modules_embed_parameters_weight_, None, None, 2.0, False, False);  l_tokens_ = None
        sparse_linear_default: "f32[2, 5, 32]" = torch.ops.agpe.sparse_linear.default(embedding, l_self_modules_fc_parameters_weight_, l_self_modules_fc_parameters_bias_, agpe_fc_block_mask, agpe_fc_saliency, agpe_fc_saliency_dense_grad_sq, agpe_fc_saliency_score_dense, agpe_fc_saliency_counters, agpe_fc_block_layout, 16, 'taylor');  embedding = l_self_modules_fc_parameters_weight_ = l_self_modules_fc_parameters_bias_ = agpe_fc_block_mask = agpe_fc_saliency = agpe_fc_saliency_dense_grad_sq = agpe_fc_saliency_score_dense = agpe_fc_saliency_counters = agpe_fc_block_layout = None
        relu: "f32[2, 5, 32]" = torch.nn.functional.relu(sparse_linear_default);  sparse_linear_default = None
        linear_1: "f32[2, 5, 64]" = torch._C._nn.linear(relu, l_self_modules_embed_parameters_weight_, None);  relu = l_self_modules_embed_parameters_weight_ = None
        return (linear_1,)
""")

    def test_graph_break(self):
        # Things to note: the graph break splits the model into two Dynamo graphs; each is
        # rewritten on its own and carries only its own layer's placeholders.
        first, second = rewritten_graphs(BrokenMLP((32, 32, 16)), torch.randn(4, 32))
        self.assertExpectedInline(first, """\
class AgpeGraphModule(torch.nn.Module):
    def forward(self, L_self_modules_layers_modules_0_parameters_weight_: "f32[32, 32]", L_self_modules_layers_modules_0_parameters_bias_: "f32[32]", L_x_: "f32[4, 32]", agpe_layers_0_block_mask, agpe_layers_0_saliency, agpe_layers_0_saliency_dense_grad_sq, agpe_layers_0_saliency_score_dense, agpe_layers_0_saliency_counters, agpe_layers_0_block_layout):
        l_self_modules_layers_modules_0_parameters_weight_ = L_self_modules_layers_modules_0_parameters_weight_
        l_self_modules_layers_modules_0_parameters_bias_ = L_self_modules_layers_modules_0_parameters_bias_
        l_x_ = L_x_

        sparse_linear_default: "f32[4, 32]" = torch.ops.agpe.sparse_linear.default(l_x_, l_self_modules_layers_modules_0_parameters_weight_, l_self_modules_layers_modules_0_parameters_bias_, agpe_layers_0_block_mask, agpe_layers_0_saliency, agpe_layers_0_saliency_dense_grad_sq, agpe_layers_0_saliency_score_dense, agpe_layers_0_saliency_counters, agpe_layers_0_block_layout, 16, 'taylor');  l_x_ = l_self_modules_layers_modules_0_parameters_weight_ = l_self_modules_layers_modules_0_parameters_bias_ = agpe_layers_0_block_mask = agpe_layers_0_saliency = agpe_layers_0_saliency_dense_grad_sq = agpe_layers_0_saliency_score_dense = agpe_layers_0_saliency_counters = agpe_layers_0_block_layout = None
        x: "f32[4, 32]" = torch.nn.functional.relu(sparse_linear_default);  sparse_linear_default = None
        return (x,)
""")
        self.assertExpectedInline(second, """\
class AgpeGraphModule(torch.nn.Module):
    def forward(self, L_self_modules_layers_modules_1_parameters_weight_: "f32[16, 32]", L_self_modules_layers_modules_1_parameters_bias_: "f32[16]", L_x_: "f32[4, 32]", agpe_layers_1_block_mask, agpe_layers_1_saliency, agpe_layers_1_saliency_dense_grad_sq, agpe_layers_1_saliency_score_dense, agpe_layers_1_saliency_counters, agpe_layers_1_block_layout):
        l_self_modules_layers_modules_1_parameters_weight_ = L_self_modules_layers_modules_1_parameters_weight_
        l_self_modules_layers_modules_1_parameters_bias_ = L_self_modules_layers_modules_1_parameters_bias_
        l_x_ = L_x_

        sparse_linear_default: "f32[4, 16]" = torch.ops.agpe.sparse_linear.default(l_x_, l_self_modules_layers_modules_1_parameters_weight_, l_self_modules_layers_modules_1_parameters_bias_, agpe_layers_1_block_mask, agpe_layers_1_saliency, agpe_layers_1_saliency_dense_grad_sq, agpe_layers_1_saliency_score_dense, agpe_layers_1_saliency_counters, agpe_layers_1_block_layout, 16, 'taylor');  l_x_ = l_self_modules_layers_modules_1_parameters_weight_ = l_self_modules_layers_modules_1_parameters_bias_ = agpe_layers_1_block_mask = agpe_layers_1_saliency = agpe_layers_1_saliency_dense_grad_sq = agpe_layers_1_saliency_score_dense = agpe_layers_1_saliency_counters = agpe_layers_1_block_layout = None
        return (sparse_linear_default,)
""")

    def test_matmul_forms(self):
        # Things to note: x @ W.T, torch.matmul(x, W.t()) and addmm(b, x, W.t()) with a bare
        # parameter all become sparse_linear (addmm keeps its bias); the transposes are gone.
        class Forms(nn.Module):
            def __init__(self):
                super().__init__()
                self.w = nn.Parameter(torch.randn(32, 32))
                self.b = nn.Parameter(torch.randn(32))

            def forward(self, x):
                return torch.addmm(self.b, x @ self.w.T + torch.matmul(x, self.w.t()), self.w.t())

        (graph,) = rewritten_graphs(Forms(), torch.randn(4, 32))
        self.assertExpectedInline(graph, """\
class AgpeGraphModule(torch.nn.Module):
    def forward(self, L_self_parameters_b_: "f32[32]", L_self_parameters_w_: "f32[32, 32]", L_x_: "f32[4, 32]", agpe_w_block_mask, agpe_w_saliency, agpe_w_saliency_dense_grad_sq, agpe_w_saliency_score_dense, agpe_w_saliency_counters, agpe_w_block_layout):
        l_self_parameters_b_ = L_self_parameters_b_
        l_self_parameters_w_ = L_self_parameters_w_
        l_x_ = L_x_

        sparse_linear_default: "f32[4, 32]" = torch.ops.agpe.sparse_linear.default(l_x_, l_self_parameters_w_, None, agpe_w_block_mask, agpe_w_saliency, agpe_w_saliency_dense_grad_sq, agpe_w_saliency_score_dense, agpe_w_saliency_counters, agpe_w_block_layout, 16, 'taylor')
        sparse_linear_default_1: "f32[4, 32]" = torch.ops.agpe.sparse_linear.default(l_x_, l_self_parameters_w_, None, agpe_w_block_mask, agpe_w_saliency, agpe_w_saliency_dense_grad_sq, agpe_w_saliency_score_dense, agpe_w_saliency_counters, agpe_w_block_layout, 16, 'taylor');  l_x_ = None
        add: "f32[4, 32]" = sparse_linear_default + sparse_linear_default_1;  sparse_linear_default = sparse_linear_default_1 = None
        sparse_linear_default_2: "f32[4, 32]" = torch.ops.agpe.sparse_linear.default(add, l_self_parameters_w_, l_self_parameters_b_, agpe_w_block_mask, agpe_w_saliency, agpe_w_saliency_dense_grad_sq, agpe_w_saliency_score_dense, agpe_w_saliency_counters, agpe_w_block_layout, 16, 'taylor');  add = l_self_parameters_w_ = l_self_parameters_b_ = agpe_w_block_mask = agpe_w_saliency = agpe_w_saliency_dense_grad_sq = agpe_w_saliency_score_dense = agpe_w_saliency_counters = agpe_w_block_layout = None
        return (sparse_linear_default_2,)
""")
