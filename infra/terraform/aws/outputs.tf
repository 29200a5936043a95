output "lake_uri" {
  description = "DAG param lake_uri"
  value       = "s3://${aws_s3_bucket.this["lake"].id}/lake"
}

output "registry_uri" {
  description = "DAG param registry_uri"
  value       = "s3://${aws_s3_bucket.this["registry"].id}/registry"
}

output "runs_uri" {
  description = "DAG param runs_uri"
  value       = "s3://${aws_s3_bucket.this["artifacts"].id}/runs"
}

output "releases_uri" {
  description = "Prefix for infra/build.sh --upload (add the version)"
  value       = "s3://${aws_s3_bucket.this["artifacts"].id}/releases"
}

output "log_uri" {
  description = "admm_deploy.log_uri"
  value       = "s3://${aws_s3_bucket.this["artifacts"].id}/logs/emr-serverless/"
}

output "emr_application_id" {
  description = "admm_deploy.emr_application_id"
  value       = aws_emrserverless_application.train.id
}

output "execution_role_arn" {
  description = "admm_deploy.execution_role_arn"
  value       = aws_iam_role.job.arn
}

output "job_access_policy_arn" {
  description = "The job's S3 policy; attach it to an EMR on EC2 instance profile role for the emr target"
  value       = aws_iam_policy.job_access.arn
}

output "airflow_policy_arn" {
  description = "Attach to the IAM role Airflow runs as (connection aws_default)"
  value       = aws_iam_policy.airflow.arn
}

output "emr_serverless_image_repository" {
  description = "ECR repository for infra/docker/emr-serverless.Dockerfile"
  value       = aws_ecr_repository.emr_serverless_runtime.repository_url
}
