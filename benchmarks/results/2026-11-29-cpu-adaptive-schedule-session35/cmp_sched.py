import importlib.util, sys, random
spec=importlib.util.spec_from_file_location("as_old",__import__("sys").argv[1]); O=importlib.util.module_from_spec(spec); sys.modules["as_old"]=O; spec.loader.exec_module(O)
from agpe_compile.controller import adaptive_schedule as N
for M,name in ((O,'old'),(N,'new')):
    sched=M.AdaptiveSchedule(1.0,0.1,end_step=10000,update_interval=100)
    st, level, ev = sched.initial_state(), 1.0, []
    for i in range(100):
        st=sched.next_state(st,(i+1)*100,M.Feedback(loss=level))
        if st.event.startswith('prune'): level*=1.08
        ev.append(st.event)
    print(name,'lasting 8%: final at update', ev.index('hold:final') if 'hold:final' in ev else None, 'deadline', ev.count('prune:deadline'))
    for noise in (0.05, 0.10):
        out=[]
        for sd in range(5):
            rng=random.Random(sd); sched=M.AdaptiveSchedule(1.0,0.1,end_step=10000,update_interval=100); st=sched.initial_state(); ds=[]
            for i in range(100):
                st=sched.next_state(st,(i+1)*100,M.Feedback(loss=1.0+rng.gauss(0,noise))); ds.append(sched.density(st))
            out.append(ds.index(0.1))
        print('  flat loss, noise',noise,'final reached at update', out)
    out=[]
    for sd in range(5):
        rng=random.Random(sd); sched=M.AdaptiveSchedule(1.0,0.1,end_step=10000,update_interval=100); st=sched.initial_state(); ds=[]
        for i in range(100):
            st=sched.next_state(st,(i+1)*100,M.Feedback(loss=(2.0*0.97**i+0.5)*(1+rng.gauss(0,0.05)))); ds.append(sched.density(st))
        out.append(ds.index(0.1))
    print('  falling loss, noise 0.05, final reached at update', out)
