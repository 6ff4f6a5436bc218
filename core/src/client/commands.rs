//! Shell commands: what each turns into (a request, a hash job, a local
//! answer), and what its answer does to the engine (a session, a share, a
//! download started).

use super::*;

impl ClientEngine {
    pub(super) fn handle_command(&mut self, ticket: Ticket, cmd: ShellCommand, now: Millis) {
        let done = |this: &mut Self, result| this.out.push_back(ClientOutput::Done { ticket, result });
        let logged_in = self.session.is_some();
        match &cmd {
            ShellCommand::Help => return done(self, Ok(crate::shell::help())),
            ShellCommand::ShowDownloads { verbose } => return done(self, Ok(self.show_downloads(*verbose))),
            ShellCommand::ShowUploads => return done(self, Ok(self.show_uploads())),
            ShellCommand::Exit if !logged_in => return done(self, Ok(render(&cmd, &Reply::Done))),
            ShellCommand::Login { .. } if logged_in => {
                let user = self.user().cloned().expect("logged in");
                return done(self, Err(ShellError::AlreadyLoggedIn(user)));
            }
            ShellCommand::CreateUser { .. } | ShellCommand::Login { .. } | ShellCommand::Exit => {}
            _ if !logged_in => return done(self, Err(ApiError::NotLoggedIn.into())),
            _ => {}
        }
        let request = match &cmd {
            ShellCommand::CreateUser { user, password } => {
                Request::CreateUser { user: user.clone(), password: password.clone() }
            }
            ShellCommand::Login { user, password } => Request::Login {
                user: user.clone(),
                password: password.clone(),
                listen: self.cfg.listen,
                plaintext_peers: self.cfg.plaintext_peers,
            },
            ShellCommand::CreateGroup { group } => Request::CreateGroup { group: group.clone() },
            ShellCommand::JoinGroup { group } => Request::JoinGroup { group: group.clone() },
            ShellCommand::LeaveGroup { group } => Request::LeaveGroup { group: group.clone() },
            ShellCommand::ListRequests { group } => Request::ListRequests { group: group.clone() },
            ShellCommand::AcceptRequest { group, user } => {
                Request::AcceptRequest { group: group.clone(), user: user.clone() }
            }
            ShellCommand::RejectRequest { group, user } => {
                Request::RejectRequest { group: group.clone(), user: user.clone() }
            }
            ShellCommand::ListGroups => {
                let purpose = Purpose::GroupsPage { ticket, cmd, got: Vec::new() };
                return self.send(purpose, Request::ListGroupsPage { after: None }, now);
            }
            ShellCommand::ListMyGroups => Request::ListMyGroups,
            ShellCommand::ListFiles { group } => Request::ListFiles { group: group.clone() },
            ShellCommand::UploadFile { path, group } => {
                let base = std::path::Path::new(path).file_name().and_then(|n| n.to_str()).unwrap_or("");
                let name = match FileName::new(base) {
                    Ok(n) => n,
                    Err(e) => return done(self, Err(ShellError::Local(format!("cannot share {path:?}: {e}")))),
                };
                let job = self.next_job;
                self.next_job += 1;
                self.hash_jobs.insert(job, UploadHash { ticket, cmd: cmd.clone(), group: group.clone(), name });
                self.out.push_back(ClientOutput::Disk(DiskOp::HashFile { job, path: path.clone() }));
                return;
            }
            ShellCommand::DownloadFile { group, name, .. } => {
                if let Some(e) = self.download_conflict(group, name) {
                    return done(self, Err(ShellError::Local(e)));
                }
                Request::DownloadFile { group: group.clone(), name: name.clone() }
            }
            ShellCommand::StopShare { group, name } => Request::StopShare { group: group.clone(), name: name.clone() },
            ShellCommand::Logout | ShellCommand::Exit => Request::Logout,
            ShellCommand::Help | ShellCommand::ShowDownloads { .. } | ShellCommand::ShowUploads => {
                unreachable!("answered above")
            }
        };
        self.send(Purpose::Shell { ticket, cmd }, request, now);
    }

    pub(super) fn file_hashed(&mut self, job: u64, result: Result<FileDigest, String>, now: Millis) {
        let Some(j) = self.hash_jobs.remove(&job) else { return };
        let ShellCommand::UploadFile { path, .. } = &j.cmd else { unreachable!("hash jobs come from uploads") };
        match result {
            Err(e) => self.out.push_back(ClientOutput::Done {
                ticket: j.ticket,
                result: Err(ShellError::Local(format!("cannot read {path}: {e}"))),
            }),
            Ok(digest) => {
                let meta = FileMeta { name: j.name, digest };
                self.start_share(j.group, meta, lists::ShareThen::Shell { ticket: j.ticket, cmd: j.cmd }, now);
            }
        }
    }

    /// What an answered (or abandoned) request does.
    pub(super) fn finish_request(&mut self, p: Pending, result: Result<Reply, ShellError>, now: Millis) {
        let (ticket, cmd, result) = match p.purpose {
            Purpose::Shell { ticket, cmd } => (ticket, cmd, result),
            Purpose::Heartbeat | Purpose::Announce | Purpose::Progress => return,
            Purpose::Sources(id) => return self.sources_answered(id, result, now),
            Purpose::CheckGrant(conn) => return self.grant_checked(conn, result),
            Purpose::Share(sid) => return self.share_answered(sid, result, now),
            Purpose::PutRange(sid) => return self.range_put(sid, result, now),
            Purpose::GetRange(lid, i) => return self.range_got(lid, i, result, now),
            // `list_groups` asks page after page and prints them as one list.
            Purpose::GroupsPage { ticket, cmd, mut got } => match result {
                Ok(Reply::GroupsPage { groups, more }) => {
                    let after = groups.last().map(|g| g.group.clone());
                    got.extend(groups);
                    if let (true, Some(after)) = (more, after) {
                        let purpose = Purpose::GroupsPage { ticket, cmd, got };
                        return self.send(purpose, Request::ListGroupsPage { after: Some(after) }, now);
                    }
                    (ticket, cmd, Ok(Reply::Groups(got)))
                }
                other => (ticket, cmd, other),
            },
        };
        let result = match (&cmd, result) {
            (ShellCommand::Login { user, .. }, Ok(Reply::Session { token })) => {
                self.session = Some((token, user.clone()));
                Ok(render(&cmd, &Reply::Done))
            }
            (ShellCommand::Logout | ShellCommand::Exit, r) => {
                // Whatever the tracker said, this client's session is over.
                self.session = None;
                self.stop_serving(None, "the sharer logged out");
                r.map(|reply| render(&cmd, &reply))
            }
            (ShellCommand::StopShare { group, name }, Ok(reply)) => {
                self.stop_serving(Some((group, name)), "the sharer stopped sharing this file");
                self.shares.remove(&(group.clone(), name.clone()));
                Ok(render(&cmd, &reply))
            }
            (ShellCommand::LeaveGroup { group }, Ok(reply)) => {
                let names: Vec<FileName> =
                    self.shares.keys().filter(|(g, _)| g == group).map(|(_, n)| n.clone()).collect();
                for n in names {
                    self.stop_serving(Some((group, &n)), "the sharer left the group");
                    self.shares.remove(&(group.clone(), n));
                }
                Ok(render(&cmd, &reply))
            }
            (
                ShellCommand::DownloadFile { group, name, destination },
                Ok(Reply::Download { index, sharers, grant }),
            ) => {
                let what = (group.clone(), name.clone(), destination.clone());
                // The command finishes once the chunk list is here and the
                // download is set up on disk.
                return self.start_listing(ticket, what, index, sharers, grant, now);
            }
            (_, Ok(reply)) => Ok(render(&cmd, &reply)),
            (_, Err(e)) => Err(e),
        };
        self.out.push_back(ClientOutput::Done { ticket, result });
    }
}
