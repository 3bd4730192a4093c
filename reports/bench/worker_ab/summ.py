import json,os,glob
for label in ['worker1','inproc1','worker2','inproc2','hog1']:
    for m in ['vae','dcgan']:
        ps=glob.glob(f'/tmp/ab/r/{label}/*/{m}-mnist-s0/result.json')
        if not ps: print(label, m, 'missing'); continue
        r=json.load(open(ps[0])); t=r['measurements']['train']; s=r['measurements']['sample']['samplers']; d=r['measurements']['sample']['default']; sd=s[d]
        print(f"{label:8s} {m:6s} train {t['images_per_second']:6.0f} contended={t.get('contended')} others={t.get('others_cpu') and round(t['others_cpu'],2)} | sample {sd['images_per_second']:6.0f} contended={sd.get('contended')} retimed={sd.get('retimed')} others={sd.get('others_cpu') and round(sd['others_cpu'],2)} | features {r['timings'].get('fid_features',0):.1f}s {t.get('process')}")
