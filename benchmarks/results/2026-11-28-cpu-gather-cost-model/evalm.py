import json, sys
rows=[json.loads(l) for l in open(sys.argv[1])]
FIXED=40e6
def nk(r): return (r.get("n", r.get("nk")), r.get("k", r.get("nk")))
def pick(r, kappa):
    n,k = nk(r); kk = kappa(r)
    saved = 6.0*r["m"]*n*k*(1-kk*r["capacity"])
    return "gather" if saved > FIXED else "dense"
models = {
 "current 8/5/3": lambda r: {32:8,64:5,128:3}[r["b"]],
 "median 6/3/2.3": lambda r: {32:6,64:3,128:2.3}[r["b"]],
 "median 5/3/2.2": lambda r: {32:5,64:3,128:2.2}[r["b"]],
 "2reg mn>=1M": lambda r: ({32:11,64:5.3,128:3.0} if r["m"]*nk(r)[0]>=2**20 else {32:5,64:3,128:2.2})[r["b"]],
 "2reg mnk>=1e9": lambda r: ({32:11,64:5.3,128:3.0} if r["m"]*nk(r)[0]*nk(r)[1]>=1e9 else {32:5,64:3,128:2.2})[r["b"]],
}
for name, kappa in models.items():
    loss=0; worst=0; wrong=0
    for r in rows:
        t={"gather":r["gather"],"dense":r.get("dense_zero", r.get("dense"))}
        best=min(t.values()); chosen=t[pick(r,kappa)]
        l=chosen/best-1; loss+=l; worst=max(worst,l); wrong+= l>0.05
    print(f"{name:18s} mean loss {100*loss/len(rows):5.1f}%  worst {100*worst:5.0f}%  mispicks>5%: {wrong}/{len(rows)}")
