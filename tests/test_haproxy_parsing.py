"""Parsing what each supported HAProxy version prints on its CLIs (samples as 2.2, 2.6 and 3.0 print them)."""

from __future__ import annotations

from hasentinel.haproxy import parse_show_proc, parse_show_sess, parse_show_stat

PROC_26 = """#<PID>          <type>          <reloads>       <uptime>        <version>
12582           master          1 [failed: 0]   0d00h00m02s     2.6.12-1+deb12u4
# workers
12799           worker          0               0d00h00m01s     2.6.12-1+deb12u4
12585           worker          1               0d00h00m09s     2.6.12-1+deb12u4
# programs
"""

PROC_22 = """#<PID>          <type>          <relative PID>  <reloads>       <uptime>        <version>
4100            master          0               2               0d00h01m00s     2.2.9-2+deb11u7
# workers
4200            worker          1               0               0d00h00m03s     2.2.9-2+deb11u7
4150            worker          [was: 1]        1               0d00h00m30s     2.2.9-2+deb11u7
# programs
"""

PROC_30 = """#<PID>          <type>          <reloads>       <uptime>        <version>
700             master          3 [failed: 1]   0d00h05m00s     3.0.11-1+deb13u4
# workers
901             worker          0               0d00h00m01s     3.0.11-1+deb13u4
# old workers
800             worker          1               0d00h01m00s     3.0.11-1+deb13u4
# programs
"""


def test_show_proc_26() -> None:
    """2.6: reload and failed counters on the master, old workers have reloads > 0."""
    info = parse_show_proc(PROC_26)
    assert (info.master.pid, info.master.reloads, info.master.failed) == (12582, 1, 0)
    assert [w.pid for w in info.current_workers] == [12799]
    assert [w.pid for w in info.old_workers] == [12585]


def test_show_proc_22_relative_pid_column() -> None:
    """2.2: the relative-PID column and `[was: N]` of old workers are understood."""
    info = parse_show_proc(PROC_22)
    assert (info.master.pid, info.master.reloads, info.master.failed) == (4100, 2, None)
    assert [w.pid for w in info.current_workers] == [4200]
    assert [w.pid for w in info.old_workers] == [4150]
    assert info.master.version == "2.2.9-2+deb11u7"


def test_show_proc_30_old_workers_section() -> None:
    """3.0: old workers in their own section, failed counter read."""
    info = parse_show_proc(PROC_30)
    assert (info.master.reloads, info.master.failed) == (3, 1)
    assert [w.pid for w in info.old_workers] == [800]
    assert [w.pid for w in info.current_workers] == [901]


def test_show_stat_keeps_only_the_apiserver_backend() -> None:
    """Servers of kube-apiservers with status, sessions and bytes; other proxies ignored."""
    text = (
        "# pxname,svname,qcur,qmax,scur,smax,slim,stot,bin,bout,status,check_status,addr\n"
        "kube-apiserver,FRONTEND,,,3,5,,10,100,200,OPEN,,\n"
        "kube-apiservers,master-1,0,0,2,4,,7,50,60,UP,L4OK,10.0.0.1:6443\n"
        "kube-apiservers,master-2,0,0,0,1,,3,5,6,MAINT,,10.0.0.2:6443\n"
        "kube-apiservers,BACKEND,0,0,2,4,,10,55,66,UP,,\n"
        "stats,master-1,0,0,0,0,,0,0,0,no check,,\n"
    )
    views = parse_show_stat(text)
    assert set(views) == {"master-1", "master-2"}
    assert (views["master-1"].sessions, views["master-1"].bytes_in, views["master-1"].admin) == (
        2,
        50,
        "ready",
    )
    assert views["master-2"].admin == "maint"
    assert not views["master-2"].operational


def test_show_sess_finds_sessions_per_server() -> None:
    """Session pointers of the backend's servers are extracted for `shutdown session`."""
    text = (
        "0x55d5c5f0a2c0: proto=tcpv4 src=127.0.0.1:41234 fe=kube-apiserver be=kube-apiservers "
        "srv=master-2 ts=00 epoch=0 age=5s calls=2\n"
        "0x55d5c5f0b000: proto=tcpv4 src=127.0.0.1:41236 fe=kube-apiserver be=kube-apiservers "
        "srv=master-1 ts=00 epoch=0 age=5s calls=2\n"
        "0x55d5c5f0c000: proto=unix_stream src=unix:1 fe=GLOBAL be=<NONE> srv=<none> ts=02\n"
    )
    sessions = parse_show_sess(text)
    assert [(s.ident, s.server) for s in sessions] == [
        ("0x55d5c5f0a2c0", "master-2"),
        ("0x55d5c5f0b000", "master-1"),
    ]
