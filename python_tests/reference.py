"""Pure-torch references the kernels are tested against (independent of slimkern's code)."""
import torch
import torch.nn.functional as F


# --- switchable batch norm ----------------------------------------------------------------
def ref_switchable_batch_norm(x, weight, bias, running_mean, running_var, blocks, stat_rows, training,
                              momentum, eps, activation="none", num_batches_tracked=None):
    """Per block: F.batch_norm on its channel slice with its stats row (updated in place through
    the row view), then the activation; outputs concatenated. momentum=None follows
    nn.BatchNorm's cumulative average: each used row's counter += 1, factor 1 / counter."""
    blocks = [tuple(int(v) for v in b) for b in blocks]
    stat_rows = [int(r) for r in stat_rows]
    if training and num_batches_tracked is not None:
        for r in sorted(set(stat_rows)):
            num_batches_tracked[r] += 1
    outs, off = [], 0
    for (a, b), r in zip(blocks, stat_rows):
        xg = x[:, off:off + b - a]
        off += b - a
        m = momentum
        if training and momentum is None:
            m = 1.0 / float(num_batches_tracked[r])
        y = F.batch_norm(xg, running_mean[r, a:b], running_var[r, a:b],
                         None if weight is None else weight[a:b], None if bias is None else bias[a:b],
                         training, 0.0 if m is None else m, eps)
        if activation == "relu":
            y = F.relu(y)
        elif activation == "relu6":
            y = F.relu6(y)
        outs.append(y)
    return torch.cat(outs, 1)
