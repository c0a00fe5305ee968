"""Large gathered outputs reuse their memory only once nothing references it."""
import torch

from autotp.runtime.transports import buffers


def test_reused_only_when_nothing_holds_it():
    shape = (2048, 8192)  # 64 MB of float32: kept (32 MB and over)
    pool = buffers.Pool()
    a = pool.empty(shape, torch.float32)
    a.fill_(1.0)
    ptr = a.data_ptr()
    b = pool.empty(shape, torch.float32)  # `a` still held: fresh memory
    assert b.data_ptr() != ptr and torch.all(a == 1.0)
    view = b[:, -1]
    del b
    c = pool.empty(shape, torch.float32)  # a view of `b` still held: fresh memory again
    assert c.data_ptr() not in (ptr, view.data_ptr() - (8191 * 4)), "memory a view still reads was handed out"
    ptr_c = c.data_ptr()
    del c
    d = pool.empty((1100, 8192), torch.float32)  # nothing holds the kept buffer: its memory again
    assert d.data_ptr() == ptr_c and d.shape == (1100, 8192)
    saved = [d.view(-1)]  # a caller keeps a reshaped view in a list
    del d
    e = pool.empty(shape, torch.float32)
    assert e.data_ptr() != ptr_c and saved[0].shape == (1100 * 8192,)
    del e, saved
    f = pool.empty(shape, torch.float32)
    ptr_f = f.data_ptr()
    y = f * torch.ones((), requires_grad=True)  # autograd saved f for y's backward
    del f
    g = pool.empty(shape, torch.float32)
    assert g.data_ptr() != ptr_f and y.grad_fn is not None
    small = pool.empty((4, 4), torch.float32)  # small ones are plain allocations, never kept
    assert torch.float32 in pool._kept and pool._kept[torch.float32].numel() >= 2048 * 8192
    assert small.shape == (4, 4)
    pool.release()
    assert not pool._kept
