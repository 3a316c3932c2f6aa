import torch, time, warnings, json, sys
warnings.filterwarnings("ignore")
torch.manual_seed(0)
def best(fn, budget=0.15):
    for _ in range(2): fn()
    s=time.perf_counter(); fn(); one=time.perf_counter()-s
    n=max(1,int(budget/5/max(one,1e-6)))
    t=float('inf')
    for _ in range(5):
        s=time.perf_counter()
        for _ in range(n): fn()
        t=min(t,(time.perf_counter()-s)/n*1e3)
    return t
res=[]
f=int(sys.argv[1]) if len(sys.argv)>1 else 1024
for b in (8,16,32,64):
  R=f//b
  for m in (32,128,512,2048):
    X=torch.randn(m,f); dY=torch.randn(m,f)
    for d in (0.05,0.1,0.15,0.25,0.35,0.5):
        mask=torch.rand(R,R)<d
        W=torch.randn(f,f)*mask.repeat_interleave(b,0).repeat_interleave(b,1)
        rows, cols = mask.nonzero(as_tuple=True)
        crow = torch.zeros(R+1, dtype=torch.int32); crow[1:] = torch.cumsum(torch.bincount(rows, minlength=R),0)
        c2, r2 = mask.t().nonzero(as_tuple=True)
        ccol = torch.zeros(R+1, dtype=torch.int32); ccol[1:] = torch.cumsum(torch.bincount(c2, minlength=R),0)
        cols32, r232 = cols.int(), r2.int()
        def fwd():
            Wb=torch.sparse_bsr_tensor(crow, cols32, W.view(R,b,R,b).transpose(1,2)[rows, cols], (f,f), check_invariants=False)
            return (Wb@X.t()).t().contiguous()
        def dx():
            Wt=torch.sparse_bsr_tensor(ccol, r232, W.view(R,b,R,b)[r2,:,c2,:].transpose(1,2), (f,f), check_invariants=False)
            return (Wt@dY.t()).t().contiguous()
        assert torch.allclose(fwd(), X@W.t(), atol=1e-3, rtol=1e-3)
        assert torch.allclose(dx(), dY@W, atol=1e-3, rtol=1e-3)
        r=dict(b=b,m=m,d=d,nnz=int(mask.sum()),fwd_dense=best(lambda: X@W.t()),fwd_bsr=best(fwd),dx_dense=best(lambda: dY@W),dx_bsr=best(dx))
        res.append(r); print(r, f"fwd {r['fwd_bsr']/r['fwd_dense']:.2f} dx {r['dx_bsr']/r['dx_dense']:.2f}", flush=True)
json.dump(res, open(f"/tmp/s15/sweep{f}.json","w"))
